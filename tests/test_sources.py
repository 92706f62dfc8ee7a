"""Model sources: tiny/random builds of upstream classes, checkpoint folders, clear errors."""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from chatterbox.models.s3gen import S3Gen
from chatterbox.models.t3 import T3
from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
from chatterbox.models.voice_encoder import VoiceEncoder
from chatterbox.mtl_tts import ChatterboxMultilingualTTS
from chatterbox.tts import ChatterboxTTS
from safetensors.torch import load_file, save_file

from tts_workbench.core.errors import ConfigError, SourceError
from tts_workbench.core.families import FAMILIES
from tts_workbench.core.files import check_folder
from tts_workbench.models import builders, checkpoints, frontends
from tts_workbench.models.checkpoints import METADATA_FILE, load_folder, save_checkpoint
from tts_workbench.models.frontends import build_tokenizer_json
from tts_workbench.models.reference import check_reference, generated_voice, make_reference_wav
from tts_workbench.models.sources import check_source, load_model, model_summary
from tts_workbench.runtime.generation import generate, prepare_voice
from tts_workbench.runtime.streaming import SAMPLES_PER_TOKEN, StreamConfig, stream_all


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


def test_tiny_is_the_upstream_classes() -> None:
    tts = load_model("tiny", seed=3)
    assert isinstance(tts, ChatterboxTTS)
    assert isinstance(tts.t3, T3) and isinstance(tts.s3gen, S3Gen) and isinstance(tts.ve, VoiceEncoder)
    assert tts.t3.cfg.num_hidden_layers == 2 and tts.t3.cfg.hidden_size == 256
    # upstream's Llama_520M has a key and value head per query head (no grouped-query attention)
    llama = LLAMA_CONFIGS["Llama_520M"]
    assert llama["num_key_value_heads"] == llama["num_attention_heads"]
    assert tts.t3.cfg.num_key_value_heads == tts.t3.cfg.num_attention_heads == 4
    assert sum(p.numel() for p in tts.s3gen.parameters()) < 30e6  # full S3Gen: 264 M
    summary = model_summary(tts)
    assert list(summary) == ["ve", "t3", "s3gen"]
    for part in summary.values():
        assert part["bytes"] == 4 * part["parameters"] and part["dtypes"] == ["float32"]
    tts.t3.half()
    t3 = model_summary(tts)["t3"]
    assert t3["bytes"] == 2 * t3["parameters"] == 2 * summary["t3"]["parameters"]
    assert t3["dtypes"] == ["float16"]


def test_small_backbones_leave_upstream_llama_configs_unchanged(tmp_path: Path) -> None:
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


def test_a_build_past_the_skeletons_draws_has_the_weights_of_one_that_makes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tiny build draws what a full-size HiFT's construction draws before its own weights (the
    seeds' weights of the runs before); from a generator state seen before it sets the state
    those draws leave instead of building the HiFT again (a build 0.53 -> 0.40 s): every weight of
    every part as the build that made them. Under another default dtype the draws move the
    generator otherwise: made again, not taken from the float32 build's."""
    skeletons: list[Any] = []
    hift = builders.HiFTGenerator

    def counted(*args: Any, **kwargs: Any) -> Any:
        if "base_channels" not in kwargs:  # the tiny HiFT is built with its own width
            skeletons.append(kwargs)
        return hift(*args, **kwargs)

    monkeypatch.setattr(builders, "HiFTGenerator", counted)
    monkeypatch.setattr(builders, "_AFTER_SKELETON", {})
    made = load_model("tiny", seed=5)
    assert len(skeletons) == 1 and len(builders._AFTER_SKELETON) == 1
    kept = load_model("tiny", seed=5)
    assert len(skeletons) == 1, "the second build made the draws again"
    for part in ("t3", "s3gen", "ve"):
        a, b = _params(getattr(made, part)), _params(getattr(kept, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    load_model("tiny", seed=6)  # another state: its own draws
    assert len(skeletons) == 2 and len(builders._AFTER_SKELETON) == 2
    for dtype in (torch.float32, torch.float64):  # one generator state, two dtypes: two draws
        torch.set_default_dtype(dtype)
        try:
            with builders.own_random_state(0):
                builders._skeleton_draws()
        finally:
            torch.set_default_dtype(torch.float32)
    assert len(skeletons) == 4 and len(builders._AFTER_SKELETON) == 4


def test_every_build_has_its_own_watermarker_with_perths_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PerthNet is loaded once a process and copied into each build (a load was a sixth of a
    tiny build): each model's own network, with the weights upstream's watermarker loads. Only
    upstream's constructor sees the swap: perth's own name is perth's throughout (a user's
    watermarker made in another thread meanwhile is perth's)."""
    import perth
    from perth.perth_net.perth_net_implicit.perth_watermarker import PerthImplicitWatermarker

    from tts_workbench.models import builders

    loaded, seen = builders._perth_net, []

    def during_the_build() -> Any:
        seen.append(perth.PerthImplicitWatermarker)
        return loaded()

    monkeypatch.setattr(builders, "_perth_net", during_the_build)
    a, b = load_model("tiny"), load_model("turbo-tiny")
    assert seen == [PerthImplicitWatermarker] * 2
    assert isinstance(a.watermarker, perth.PerthImplicitWatermarker)
    assert a.watermarker.perth_net is not b.watermarker.perth_net
    upstream = perth.PerthImplicitWatermarker().perth_net.state_dict()
    for model in (a, b):
        own = model.watermarker.perth_net.state_dict()
        assert own.keys() == upstream.keys() and all(torch.equal(own[k], v) for k, v in upstream.items())
    assert all(vars(sys.modules[f.model_class.__module__])["perth"] is perth for f in FAMILIES.values())


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
    with pytest.raises(SourceError, match=f"too short \\({seconds:.2f} s.*speech of 0.5 s or more"):
        check_reference(path)
    with pytest.raises(SourceError, match="too short"):
        prepare_voice(tiny_tts, str(path))
    sf.write(path, 0.1 * np.random.default_rng(0).standard_normal(12000), 24000)  # 0.5 s
    assert any("only 0.50 s long" in note for note in check_reference(path).notes)  # accepted


def test_a_loud_clip_too_short_to_measure_is_refused_as_too_short_not_silence(tmp_path: Path) -> None:
    # In LEVEL_S's five frames or fewer the level read the quietest: 0.02 s of zeros, then 0.08 s of a
    # loud tone, was "silence" (docs/index.md: files under 0.5 s are refused as too short).
    t = np.arange(int(0.08 * 24000)) / 24000
    path = tmp_path / "short_tone.wav"
    sf.write(path, np.concatenate([np.zeros(480), 0.5 * np.sin(2 * np.pi * 200 * t)]), 24000)
    with pytest.raises(SourceError, match=r"too short \(0.10 s"):
        check_reference(path)


def test_unknown_source() -> None:
    with pytest.raises(SourceError, match="unknown model source 'tinyy'"):
        load_model("tinyy")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))


def test_checking_a_missing_folder_says_what_to_give(tmp_path: Path) -> None:
    # before: "checkpoint folder ... does not exist", with no fix
    with pytest.raises(
        SourceError, match=r"does not exist: give a folder written by save_checkpoint\(\).*tiny"
    ):
        check_source(str(tmp_path / "nowhere"))


def test_a_reference_with_a_nan_sample_is_refused_naming_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "nan.wav"
    voice = 0.1 * np.random.default_rng(0).standard_normal(24000)
    voice[100] = np.nan
    sf.write(path, voice, 24000, subtype="FLOAT")
    # before: "contains NaN or infinite samples", with no fix
    with pytest.raises(SourceError, match="NaN or infinite samples; re-export"):
        check_reference(path)


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


def test_weights_that_do_not_fit_the_recorded_architecture_say_what_to_do(tmp_path: Path) -> None:
    folder = save_checkpoint(load_model("tiny"), tmp_path / "tiny")
    narrow = save_checkpoint(load_model("deep-narrow"), tmp_path / "narrow")
    for name in ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json"):
        shutil.copy(narrow / name, folder / name)  # other weights copied over, the metadata kept
    # before: only torch's size mismatch, no fix
    advice = (
        "the weights are not the ones its tts_workbench.json describes: copy in the tts_workbench.json "
        "saved with them (for upstream's full-size weights, delete it), or save the model again"
    )
    with pytest.raises(SourceError, match=r"tiny architecture: size mismatch .*" + re.escape(advice)):
        load_model(str(folder))
    shutil.copy(narrow / METADATA_FILE, folder / METADATA_FILE)  # the advice taken: it loads
    assert load_model(str(folder)).t3.cfg.num_hidden_layers == 30


@pytest.mark.parametrize("keep_dtype", [True, False])
@pytest.mark.parametrize("damage", ["misfit", "voice"])
def test_a_failed_load_keeps_none_of_the_weights_it_read(
    damage: str, keep_dtype: bool, tiny_tts: ChatterboxTTS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    if damage == "misfit":  # refused while the weights load
        state = load_file(str(folder / "t3_cfg.safetensors"))
        state["speech_head.weight"] = torch.zeros(8194, 1024)
        save_file(state, str(folder / "t3_cfg.safetensors"))
    else:  # refused once the model is assembled
        (folder / "conds.pt").write_bytes(b"")
    read: list[weakref.ref[torch.Tensor]] = []
    read_state = checkpoints._read_state

    def recorded(path: Path, owned: bool) -> Any:
        state = read_state(path, owned)
        read.extend(weakref.ref(v) for v in state.values())
        return state

    monkeypatch.setattr(checkpoints, "_read_state", recorded)
    with pytest.raises(SourceError) as failed:
        load_folder(folder, keep_dtype=keep_dtype)
    gc.collect()
    # the error still held, as IPython holds the last one (sys.last_traceback); before: its
    # frames' locals kept every weight read (and the files, mapped)
    assert failed.value.__traceback__ is not None and read
    assert [r for r in read if r() is not None] == []


def _fail_holding(value: object) -> None:
    raise ValueError("the caller's own error")


def test_a_failed_load_leaves_the_error_its_caller_was_handling_as_it_was(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    (folder / "conds.pt").write_bytes(b"")  # refused once the model is assembled
    try:
        _fail_holding(kept := object())
    except ValueError as outer:
        with pytest.raises(SourceError, match="conds.pt"):
            load_folder(folder)  # its errors' chain leads to `outer`, which is not the load's
        frames = traceback.walk_tb(outer.__traceback__)
        assert any(frame.f_locals.get("value") is kept for frame, _ in frames)  # its locals kept


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


@pytest.mark.parametrize(
    ("source", "files"),
    [
        ("pretrained", "ve.safetensors, t3_cfg.safetensors, s3gen.safetensors, tokenizer.json"),
        # before: tokenizer.json, which upstream's Turbo repository does not hold
        (
            "turbo-pretrained",
            "ve.safetensors, t3_turbo_v1.safetensors, s3gen_meanflow.safetensors, vocab.json, merges.txt, "
            "added_tokens.json, special_tokens_map.json, tokenizer_config.json",
        ),
        (
            "multilingual-pretrained",
            "ve.pt, t3_mtl23ls_v2.safetensors, s3gen.pt, grapheme_mtl_merged_expanded_v1.json",
        ),
    ],
)
def test_pretrained_offline_fails_at_once_and_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str, files: str
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the workbench stays offline all the same
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    before = c.HF_HUB_OFFLINE
    with pytest.raises(
        SourceError, match=r"load_model\('/path/to/folder'\) \(on the command line: --model /path/to/folder\)"
    ) as e:
        load_model(source)
    assert f"download {files}" in str(e.value)
    assert c.HF_HUB_OFFLINE == before  # offline only during the call
    # the hub's error is named by its type, with what is true of it here: the files are not cached
    cause = e.value.__cause__
    assert cause is not None and f"({type(cause).__name__}: not in the hub's cache" in str(e.value)
    # before: the hub's advice, "set 'HF_HUB_OFFLINE=0'" (set already) or "check your connection"
    assert "HF_HUB_OFFLINE" not in str(e.value) and "check your connection" not in str(e.value)
    assert "never downloads" in str(e.value)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"),
    ],
)
def test_a_pretrained_load_out_of_memory_is_not_blamed_on_the_downloads(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """(before 2026-12-07 any failure, an allocation too, said "download ... copy them into a folder",
    which cannot help where the files are cached and whole)"""

    def full(*_a: object, **_k: object) -> None:
        raise error

    monkeypatch.setattr(ChatterboxTTS, "from_pretrained", full)
    with pytest.raises(type(error), match="allocate"):
        load_model("pretrained")


def test_building_a_model_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_model("tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)  # the caller's draws go on as if nothing was built
    b = load_model("tiny", seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.t3.parameters(), b.t3.parameters(), strict=True))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    theirs = _params(b)
    return all(torch.equal(v, theirs[k]) for k, v in _params(a).items() if not k.startswith("patched_model."))


def test_loading_a_folder_leaves_the_callers_random_state_alone(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_folder(folder)
    load_model(str(folder))
    # before: the build and the assembly drew from the caller's generator
    assert torch.equal(torch.rand(3), expected)


def test_a_build_while_another_thread_loads_a_folder_gets_initialised_weights(
    tiny_tts: ChatterboxTTS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    alone = load_model("tiny", seed=0)
    original_init = torch.nn.init.kaiming_uniform_
    inside, b_started, b_building, b_done = (threading.Event() for _ in range(4))
    build_t3 = builders.build_t3

    def load_building_t3(*args: Any) -> T3:  # thread A, inside load_folder's no-init block
        inside.set()
        b_started.wait(60)
        # Thread B starting T3 here is the overlap; where B waits for A instead (the fix) it cannot
        # start, and only this bounded wait is spent.
        if b_building.wait(2):
            b_done.wait(120)
        return build_t3(*args)

    def b_building_t3(*args: Any) -> T3:
        b_building.set()
        return build_t3(*args)

    monkeypatch.setattr(checkpoints, "build_t3", load_building_t3)
    monkeypatch.setattr(builders, "build_t3", b_building_t3)
    out: dict[str, Any] = {}

    def run(name: str, load: Callable[[], Any]) -> None:
        try:
            out[name] = load()
        except BaseException as e:  # re-raised by the test below
            out[name] = e

    def build_in_b() -> Any:
        b_started.set()
        try:
            return builders.build_model("tiny", seed=0)
        finally:
            b_done.set()

    a = threading.Thread(target=run, args=("a", lambda: load_folder(folder)))
    b = threading.Thread(target=run, args=("b", build_in_b))
    a.start()
    assert inside.wait(120)
    b.start()
    a.join(300)
    b.join(300)
    assert not a.is_alive() and not b.is_alive()
    for result in out.values():
        if isinstance(result, BaseException):
            raise result
    # before: B's T3 was built with torch's init functions swapped for no-ops by A's block
    assert all(v.isfinite().all() for v in _params(out["b"].t3).values() if v.is_floating_point())
    assert _same_weights(out["b"].t3, alone.t3)
    assert _same_weights(out["a"].t3, tiny_tts.t3)
    assert torch.nn.init.kaiming_uniform_ is original_init


def _at_s3gen_file(monkeypatch: pytest.MonkeyPatch, act: Callable[[], object]) -> None:
    """``act`` runs as a save comes to writing S3Gen's file (T3's written before it)."""
    write = checkpoints.save_file

    def writing(state: dict[str, torch.Tensor], path: str) -> None:
        if Path(path).name.startswith("s3gen"):
            act()
        write(state, path)

    monkeypatch.setattr(checkpoints, "save_file", writing)


def test_an_interrupted_save_leaves_the_previous_checkpoint_or_nothing(
    tiny_tts: ChatterboxTTS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, the files were written one by one into the folder: it then loaded as new T3
    # weights with the old S3Gen, and a fresh folder was left with half a checkpoint.
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    write = checkpoints.save_file

    def disk_full() -> None:
        raise OSError("No space left on device")

    _at_s3gen_file(monkeypatch, disk_full)
    for target in (folder, tmp_path / "fresh"):
        with pytest.raises(OSError, match="No space left"):
            save_checkpoint(load_model("tiny", seed=1), target)
    loaded = load_folder(folder)
    assert all(
        _same_weights(getattr(loaded, name), getattr(tiny_tts, name)) for name in ("t3", "s3gen", "ve")
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no fresh folder, nothing left beside
    monkeypatch.setattr(checkpoints, "save_file", write)
    rename = Path.rename

    def refused_into_place(self: Path, target: Any) -> Any:
        if ".partial." in self.name:  # the new folder, after the old one was moved aside
            raise OSError(errno.EACCES, "Permission denied")
        return rename(self, target)

    with monkeypatch.context() as patched:
        patched.setattr(Path, "rename", refused_into_place)
        with pytest.raises(OSError, match="Permission denied"):
            save_checkpoint(load_model("tiny", seed=1), folder)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the old checkpoint put back
    assert _same_weights(load_folder(folder).t3, tiny_tts.t3)


def test_a_save_leaves_a_model_loaded_from_the_folder_as_it_was(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    loaded = load_folder(folder)
    save_checkpoint(load_model("tiny", seed=1), folder)
    # before: the files were rewritten in place, and the loaded model became the new one
    assert _same_weights(loaded.t3, tiny_tts.t3) and _same_weights(loaded.s3gen, tiny_tts.s3gen)


def test_a_loaded_model_keeps_its_weights_when_its_files_are_copied_over(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    other = save_checkpoint(load_model("tiny", seed=1), tmp_path / "other")
    loaded = load_folder(folder)  # keep_dtype=True: its parameters are the tensors read
    before = {k: v.clone() for k, v in _params(loaded.t3).items()}
    # rewritten in place, as cp does; before: the T3 read the new file's weights (safetensors maps
    # the files it loads), and a truncated file killed the process (SIGBUS) at its next read
    shutil.copyfile(other / "t3_cfg.safetensors", folder / "t3_cfg.safetensors")
    after = _params(loaded.t3)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_save_without_a_voice_drops_the_previous_voice(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    unvoiced = load_model("tiny", seed=1)
    assert unvoiced.conds is None
    save_checkpoint(unvoiced, folder)
    assert load_folder(folder).conds is None  # before: the old conds.pt loaded as its voice


def test_a_save_refuses_a_folder_that_holds_other_files(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")  # a save replaces the whole folder
    with pytest.raises(SourceError, match="neither an empty folder nor a checkpoint.*new or empty folder"):
        save_checkpoint(tiny_tts, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_save_through_a_link_replaces_the_folder_it_names(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(save_checkpoint(tiny_tts, tmp_path / "ckpt"))
    save_checkpoint(load_model("tiny", seed=1), tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "link"]
    assert not _same_weights(load_folder(tmp_path / "ckpt").t3, tiny_tts.t3)


def test_a_save_into_a_mount_point_is_refused_before_anything_is_written(
    tiny_tts: ChatterboxTTS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point = tmp_path.resolve() / "point"
    point.mkdir()
    refused = f"{re.escape(str(point))} is a mount point; .* give a folder inside it"
    ismount, rename = os.path.ismount, Path.rename
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == point or ismount(p))
    # before: every save failed at moving the folder aside, with a bare OSError (EBUSY)
    with pytest.raises(SourceError, match=refused):
        save_checkpoint(tiny_tts, point)
    assert [p.name for p in tmp_path.iterdir()] == ["point"] and not any(point.iterdir())

    def busy(self: Path, target: Path) -> Path:  # a mount point ismount does not tell (a bind mount)
        if self == point:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(self))
        return rename(self, target)

    monkeypatch.setattr(os.path, "ismount", ismount)
    monkeypatch.setattr(Path, "rename", busy)
    with pytest.raises(SourceError, match=refused):
        save_checkpoint(tiny_tts, point)
    assert [p.name for p in tmp_path.iterdir()] == ["point"] and not any(point.iterdir())


def test_s3gen_weights_missing_from_the_file_are_refused(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    path = folder / "s3gen.safetensors"
    state = {k: v.clone() for k, v in load_file(str(path)).items()}  # not views of the file rewritten
    # upstream's own files may lack these two (S3Gen.ignore_state_dict_missing): rebuilt, not read
    del state["tokenizer._mel_filters"], state["tokenizer.window"]
    save_file(state, str(path))
    loaded = load_model(str(folder))
    assert torch.equal(loaded.s3gen.tokenizer._mel_filters, tiny_tts.s3gen.tokenizer._mel_filters)
    gone = [k for k in state if k.startswith("flow.decoder.estimator.")]
    save_file({k: v for k, v in state.items() if k not in gone}, str(path))
    # before: loaded, the estimator left as uninitialised memory
    with pytest.raises(
        SourceError, match=f"s3gen.safetensors in .* lacks {len(gone)} .*flow.decoder.estimator.*copy it"
    ):
        load_model(str(folder))


def test_the_family_recorded_in_the_folder_is_loaded(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    standard = save_checkpoint(tiny_tts, tmp_path / "standard")
    turbo = load_model("turbo-tiny")
    folder = save_checkpoint(turbo, tmp_path / "turbo")
    for name in ("t3_cfg.safetensors", "s3gen.safetensors"):  # a standard model's files copied in
        shutil.copy(standard / name, folder / name)
    loaded = load_folder(folder)  # before: read as a standard model, and failed
    assert type(loaded) is type(turbo) and _same_weights(loaded.t3, turbo.t3)
    (folder / "t3_turbo_v1.safetensors").unlink()
    # before: "holds a turbo model (t3_turbo_v1.safetensors)", a file that is not there, with
    # family="standard"; without, "missing t3_turbo_v1.safetensors, ...", the standard files unnamed
    for family in (None, "standard"):
        with pytest.raises(
            SourceError,
            match=rf'{METADATA_FILE} in .* records turbo.*t3_cfg.safetensors \(standard\).*"family"'
            '.*"standard".*delete it',
        ):
            load_model(str(folder), family=family)
    (folder / "t3_cfg.safetensors").unlink()  # no family's T3 file: the recorded family's are missing
    with pytest.raises(
        SourceError, match=f"turbo model folder .* is missing t3_turbo_v1.safetensors.*{METADATA_FILE}"
    ):
        load_folder(folder)


def test_a_half_precision_voice_is_saved_in_float32(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    def bf16(v: object) -> object:  # the voice as a half-precision wrapper holds it
        return v.detach().bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    tts, conds = load_model("tiny"), tiny_tts.conds
    t3 = dataclasses.replace(conds.t3, **{k: bf16(v) for k, v in vars(conds.t3).items()})
    tts.conds = type(conds)(t3, {k: bf16(v) for k, v in conds.gen.items()})
    loaded = load_model(str(save_checkpoint(tts, tmp_path / "ckpt")))
    saved = torch.load(tmp_path / "ckpt" / "conds.pt", weights_only=True)
    tensors = [v for part in saved.values() for v in part.values() if torch.is_tensor(v)]
    assert {v.dtype for v in tensors if v.is_floating_point()} == {torch.float32}
    # before: "mat1 and mat2 must have the same dtype"
    wav, _ = stream_all(loaded, "Hi there.", StreamConfig("buffered"), max_new_tokens=5)
    assert np.isfinite(wav).all()


def test_an_interrupted_tokenizer_cache_write_leaves_no_half_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TTS_WORKBENCH_CACHE", str(tmp_path))
    build = frontends.build_tokenizer_json

    def interrupted(path: Path) -> Path:
        path.write_bytes(build(path).read_bytes()[:100])
        raise OSError("No space left on device")

    monkeypatch.setattr(frontends, "build_tokenizer_json", interrupted)
    with pytest.raises(SourceError, match="No space left.*TTS_WORKBENCH_CACHE"):
        load_model("tiny")
    assert list(tmp_path.iterdir()) == []  # before: the half file, and every later build failed
    monkeypatch.setattr(frontends, "build_tokenizer_json", build)
    load_model("tiny")


def test_a_cache_folder_that_cannot_be_made_names_the_variable_not_the_output_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tts_workbench.interface.cli import main

    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("TTS_WORKBENCH_CACHE", str(afile))
    with pytest.raises(SourceError, match=re.escape(str(afile)) + r" \(File exists\).*TTS_WORKBENCH_CACHE"):
        frontends.default_tokenizer("standard")
    # before: a bare OSError, which the CLI blamed on the output folder ("give another folder (--out)")
    assert main(["stream", "--model", "tiny", "--tokens", "2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "TTS_WORKBENCH_CACHE" in err and "--out" not in err


@pytest.mark.parametrize("value", ["", "~/x"])
def test_an_empty_cache_variable_means_the_default_and_a_tilde_is_the_home_folder(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TTS_WORKBENCH_CACHE", value)
    monkeypatch.chdir(cwd)
    cache = home / "x" if value else home / ".cache" / "tts_workbench"
    assert frontends.default_tokenizer("standard") == cache / "tokenizer.json"
    assert (cache / "tokenizer.json").exists()
    assert list(cwd.iterdir()) == []  # before: tokenizer.json here, or a folder named "~"


def test_a_damaged_tokenizer_cache_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTS_WORKBENCH_CACHE", str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(SourceError, match=re.escape(str(tmp_path / "tokenizer.json")) + ".*delete it"):
        load_model("tiny")  # before: "EOF while parsing a value", no file named


@pytest.mark.parametrize("donor", ["turbo", "multilingual", "standard"])
def test_another_familys_tokenizer_in_the_cache_names_the_file(
    donor: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Turbo's GPT-2 file: upstream EnTokenizer fails a bare assert (before: IndexError reading its
    # empty message); Multilingual's loads, its ids past T3's (before: "use the tokenizer files
    # that were saved with these weights", which a build has none of, and no file named); the
    # standard one as Multilingual's vocabulary loads, with no language tokens.
    monkeypatch.setenv("TTS_WORKBENCH_CACHE", str(tmp_path))
    size, name = "tiny", "tokenizer.json"
    if donor == "turbo":
        shutil.copy(frontends.build_gpt2_tokenizer(tmp_path / "gpt2") / name, tmp_path)
    elif donor == "multilingual":
        frontends.build_grapheme_vocab(tmp_path / name)
    else:
        size, name = "multilingual-tiny", frontends.GRAPHEME_VOCAB
        build_tokenizer_json(tmp_path / name)
    with pytest.raises(SourceError, match=rf"cached tokenizer .*{re.escape(name)}.*delete it") as e:
        load_model(size)
    assert str(tmp_path / name) in str(e.value)
    assert "saved with these weights" not in str(e.value)


def _pt_layout(folder: Path) -> Path:
    """Checkpoint ``folder`` with its weights moved to the streaming fork's ``.pt`` files."""
    for name in ("ve", "t3_cfg", "s3gen"):
        torch.save(load_file(str(folder / f"{name}.safetensors")), folder / f"{name}.pt")
        (folder / f"{name}.safetensors").unlink()
    return folder


def test_a_damaged_pt_file_says_to_copy_it_again(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    folder = _pt_layout(save_checkpoint(tiny_tts, tmp_path / "ckpt"))
    (folder / "s3gen.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SourceError, match="cannot read s3gen.pt.*copy it again") as e:
        load_model(str(folder))
    assert "weights_only" not in str(e.value)  # before: torch's advice to load it unsafely


@pytest.mark.parametrize("content", [[torch.zeros(3)], torch.zeros(3)], ids=["list", "tensor"])
def test_a_pt_file_holding_no_mapping_of_tensors_says_to_copy_it_again(
    tiny_tts: ChatterboxTTS, tmp_path: Path, content: Any
) -> None:
    folder = _pt_layout(save_checkpoint(tiny_tts, tmp_path / "ckpt"))
    torch.save(content, folder / "s3gen.pt")
    # before: TypeError: Expected state_dict to be dict-like, naming no file
    with pytest.raises(
        SourceError, match=rf"cannot read s3gen.pt in {re.escape(str(folder))}: .*copy it again"
    ):
        load_model(str(folder))


def test_saving_what_is_no_model_leaves_no_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a Chatterbox model"):
        save_checkpoint(object(), tmp_path / "a" / "b" / "ckpt")  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists()  # before: a/b made, then the save refused


def test_checking_a_folder_of_another_family_is_refused_as_loading_it_is(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    # before: passed, and the load refused it later
    with pytest.raises(
        SourceError, match=rf"{re.escape(str(folder))} holds a standard model .*not a turbo one"
    ):
        check_source(str(folder), "turbo")
    check_source(str(folder), "standard")


def test_a_save_refuses_a_checkpoint_folder_that_also_holds_other_files(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    written = sorted(p.name for p in folder.iterdir())
    (folder / "my_voice.wav").write_bytes(b"RIFF")
    (folder / "NOTES.md").write_text("mine")
    before = sorted(p.name for p in folder.iterdir())
    # before: the folder was replaced whole and both files deleted silently
    with pytest.raises(SourceError, match=r"NOTES.md, my_voice.wav.*move them out or give another folder"):
        save_checkpoint(load_model("tiny", seed=1), folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no partial left beside
    assert _same_weights(load_folder(folder).t3, tiny_tts.t3)
    assert json.loads((folder / "tts_workbench.json").read_text())["files"] == written


def test_a_save_refuses_a_checkpoint_folder_a_file_was_added_to_while_it_wrote(
    tiny_tts: ChatterboxTTS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    # the folder passed the first check by the time S3Gen's file is written
    _at_s3gen_file(monkeypatch, lambda: (folder / "NOTES.md").write_text("mine"))
    with pytest.raises(SourceError, match=r"holds NOTES.md, which save_checkpoint\(\) did not write"):
        save_checkpoint(load_model("tiny", seed=1), folder)
    assert (folder / "NOTES.md").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no partial left beside
    assert _same_weights(load_folder(folder).t3, tiny_tts.t3)


def test_a_model_saved_after_it_generated_loads_back(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    tts = load_model("tiny", seed=1)
    # Its own T3Cond too: upstream's T3 caches the prompt's embedding on it (made with this model's
    # weights), and a shared one left the session model speaking with it (test_optimized's
    # upstream-vs-wrapper comparisons failed in the worker that ran this test before them).
    tts.conds = dataclasses.replace(tiny_tts.conds, t3=dataclasses.replace(tiny_tts.conds.t3))
    generate(tts, "Hi.", max_new_tokens=4)
    # upstream's T3.inference keeps a second view of T3's weights, which upstream's files lack
    assert any(k.startswith("patched_model.") for k in tts.t3.state_dict())
    folder = save_checkpoint(tts, tmp_path / "ckpt")
    assert not any(k.startswith("patched_model.") for k in load_file(str(folder / "t3_cfg.safetensors")))
    loaded = load_folder(folder)
    assert all(_same_weights(getattr(loaded, name), getattr(tts, name)) for name in ("t3", "s3gen", "ve"))


def test_a_checkpoint_written_before_the_file_list_is_checked_by_the_names_a_save_writes(
    tmp_path: Path,
) -> None:
    turbo = load_model("turbo-tiny")
    folder = save_checkpoint(turbo, tmp_path / "ckpt")
    meta_path = folder / "tts_workbench.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]  # as an earlier version wrote it
    meta_path.write_text(json.dumps(meta))
    (folder / "t3_cfg.safetensors").write_bytes(b"")  # another family's, written by an earlier save
    save_checkpoint(turbo, folder)  # every name is one a save writes: replaced
    assert not (folder / "t3_cfg.safetensors").exists()
    meta_path.write_text(json.dumps(meta))
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (folder / name).write_text("mine")
    with pytest.raises(SourceError, match=r"holds a.txt, b.txt, c.txt and 1 more, .*move them out"):
        save_checkpoint(turbo, folder)
    assert (folder / "d.txt").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_save_sweeps_what_a_killed_save_left_beside_the_folder(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    dead = _dead_pid()
    partial = tmp_path / f".ckpt.partial.{dead}.1"
    partial.mkdir()
    (partial / "t3_cfg.safetensors").write_bytes(b"half")
    # saves still running, another process's and this one's (marked as its saves mark what they
    # write: this process's is told apart before the probe of its pid, so it alone would not show a
    # live process taken for a dead one): left alone
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = [tmp_path / f".ckpt.partial.{pid}.99" for pid in (os.getpid(), running.pid)]
        for folder in alive:
            folder.mkdir()
        other = tmp_path / f".other.partial.{dead}.1"  # another folder's: left alone
        other.mkdir()
        # before: a partial folder left by a killed save stayed there for good
        with checkpoints._writing(alive[0].resolve()):
            save_checkpoint(tiny_tts, tmp_path / "ckpt")
    finally:
        running.kill()
        running.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["ckpt", *(f.name for f in alive), other.name])


def test_a_save_puts_back_a_checkpoint_a_killed_save_left_moved_aside(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    dead = _dead_pid()
    old = tmp_path / f".ckpt.old.{dead}.1"
    save_checkpoint(tiny_tts, tmp_path / "ckpt").rename(old)  # killed between the two renames
    (old / "NOTES.md").write_text("mine")
    # before: the old checkpoint stayed hidden, and its NOTES.md was never checked
    with pytest.raises(SourceError, match="NOTES.md"):
        save_checkpoint(load_model("tiny", seed=1), tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert _same_weights(load_folder(tmp_path / "ckpt").t3, tiny_tts.t3)
    # a stale old beside a folder that is there is only deleted
    shutil.copytree(tmp_path / "ckpt", old)
    (tmp_path / "ckpt" / "NOTES.md").unlink()
    save_checkpoint(tiny_tts, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_what_a_killed_save_left_under_this_processs_pid_is_put_back_and_swept(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    # A container's process is PID 1 on every restart: what a save killed in an earlier run left
    # bears this process's PID, and no save of this process writes it.
    old = tmp_path / f".ckpt.old.{os.getpid()}.139999"
    save_checkpoint(tiny_tts, tmp_path / "ckpt").rename(old)  # killed between the two renames
    (old / "NOTES.md").write_text("mine")
    (tmp_path / f".ckpt.partial.{os.getpid()}.139999").mkdir()  # killed while it wrote
    # before: "does not exist", naming no checkpoint left aside; then a save left both there for good
    hint = re.escape(f"previous checkpoint in {old}: rename it to {tmp_path.resolve() / 'ckpt'}")
    with pytest.raises(SourceError, match=hint):
        load_folder(tmp_path / "ckpt")
    with pytest.raises(SourceError, match="NOTES.md"):  # put back, and its NOTES.md checked
        save_checkpoint(load_model("tiny", seed=1), tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert _same_weights(load_folder(tmp_path / "ckpt").t3, tiny_tts.t3)


def test_loading_a_missing_folder_names_the_checkpoint_a_killed_save_moved_aside(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    old = tmp_path / f".ckpt.old.{_dead_pid()}.1"
    save_checkpoint(tiny_tts, tmp_path / "ckpt").rename(old)
    hint = re.escape(f"previous checkpoint in {old}: rename it to {tmp_path.resolve() / 'ckpt'}")
    with pytest.raises(SourceError, match=hint):
        load_folder(tmp_path / "ckpt")
    assert old.exists() and not (tmp_path / "ckpt").exists()  # loading moves nothing


def test_the_command_to_put_back_a_checkpoint_left_aside_behind_a_link_works(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path.resolve() / "ckpt")
    (tmp_path / "link").symlink_to(folder)
    folder.rename(tmp_path / f".ckpt.old.{_dead_pid()}.1")
    with pytest.raises(SourceError, match="left the previous checkpoint") as refused:
        load_model(str(tmp_path / "link"))
    command = re.search(r"\((mv [^)]*)\)", str(refused.value))
    assert command is not None
    # before: mv onto the link ("cannot overwrite non-directory"), not the folder it names
    subprocess.run(shlex.split(command.group(1)), check=True, capture_output=True, timeout=60)
    assert _same_weights(load_model(str(tmp_path / "link")).t3, tiny_tts.t3)


def test_checking_a_missing_folder_names_the_checkpoint_a_killed_save_moved_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = tmp_path / f".ckpt.old.{_dead_pid()}.1"
    old.mkdir()
    hint = re.escape(f"previous checkpoint in {old}: rename it to {tmp_path.resolve() / 'ckpt'}")
    # before: "checkpoint folder ... does not exist", and for the bare name "unknown model source"
    with pytest.raises(SourceError, match=hint):
        check_source(str(tmp_path / "ckpt"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match=hint):
        load_model("ckpt")
    with pytest.raises(SourceError, match="unknown model source 'other'"):  # no folder left aside
        load_model("other")


def test_a_turbo_folder_in_the_layout_of_upstreams_hub_repository_loads(tmp_path: Path) -> None:
    turbo = load_model("turbo-tiny")
    folder = save_checkpoint(turbo, tmp_path / "turbo")  # tokenizer.json, and vocab.json + merges.txt
    text = "Hello there, it's 5 o'clock."
    ids = turbo.tokenizer(text).input_ids
    assert load_folder(folder).tokenizer(text).input_ids == ids
    (folder / "tokenizer.json").unlink()  # upstream's repository holds vocab.json + merges.txt only
    assert load_folder(folder).tokenizer(text).input_ids == ids  # before: "missing tokenizer.json"
    (folder / "merges.txt").unlink()
    with pytest.raises(SourceError, match=r"missing tokenizer.json \(or vocab.json and merges.txt\)"):
        load_folder(folder)


def test_a_damaged_metadata_file_is_named_with_the_fix(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    meta_path = folder / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    for damaged in (meta_path.read_text()[:40], "[]"):  # truncated (before: a bare JSONDecodeError)
        meta_path.write_text(damaged)
        with pytest.raises(SourceError, match=re.escape(f"{meta_path} is damaged") + ".*save the model"):
            load_model(str(folder))
    meta_path.write_text(json.dumps(meta | {"tiny_config": {"t3_layerz": 2}}))
    with pytest.raises(SourceError, match=re.escape(str(meta_path)) + ".*t3_layerz.*save the model again"):
        load_model(str(folder))  # before: TinyConfig's TypeError


def test_a_folder_with_two_families_files_is_refused_unless_the_family_is_given(
    tiny_tts: ChatterboxTTS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Upstream's standard and multilingual models come from one hub repository: a folder may hold both.
    folder = save_checkpoint(tiny_tts, tmp_path / "both")
    multilingual = save_checkpoint(load_model("multilingual-tiny"), tmp_path / "multilingual")
    for name in FAMILIES["multilingual"].files:
        shutil.copy(multilingual / name, folder / name)
    (folder / METADATA_FILE).unlink()  # upstream's own layout
    with pytest.raises(
        SourceError,
        match=r"standard \(t3_cfg.safetensors\) and multilingual \(t3_mtl23ls_v2.safetensors\).*family=",
    ):
        load_model(str(folder))  # before: loaded as the standard model, silently
    # no family recorded either, but a tiny architecture (upstream's, the default, is full size)
    meta = json.loads((multilingual / METADATA_FILE).read_text())
    (folder / METADATA_FILE).write_text(json.dumps({k: meta[k] for k in ("architecture", "tiny_config")}))
    assert type(load_model(str(folder), family="multilingual")) is ChatterboxMultilingualTTS
    monkeypatch.chdir(tmp_path)  # named without a separator: checked as a source first, family and all
    assert type(load_model("both", family="multilingual")) is ChatterboxMultilingualTTS
    with pytest.raises(SourceError, match="family= is for a checkpoint folder"):
        load_model("tiny", family="multilingual")


def test_a_near_silent_reference_is_refused_naming_its_level(reference_wav: Path, tmp_path: Path) -> None:
    # Before, only exact zeros were refused; Turbo's loudness normalisation then raised a lone
    # click past full scale.
    n = 6 * 24000
    tone = 0.3 * np.sin(2 * np.pi * 180 * np.arange(n) / 24000)
    path = tmp_path / "quiet.wav"
    for quiet, subtype in (
        (np.random.default_rng(0).integers(-1, 2, n) / 32768.0, "PCM_16"),  # 16-bit dither, -92 dBFS
        (np.r_[np.zeros(n // 2), 0.5, np.zeros(n // 2)], "PCM_16"),  # a lone click
        (np.full(n, 0.2), "FLOAT"),  # a DC offset only
        (np.stack([tone, -tone], axis=1), "FLOAT"),  # stereo in opposite phase: its mono mix is zeros
    ):
        sf.write(path, quiet, 24000, subtype=subtype)
        with pytest.raises(SourceError, match=r"level is -(\d+|inf) dBFS, under -60 dBFS.*of speech"):
            check_reference(path)
    voice, sr = sf.read(reference_wav)
    sf.write(path, 0.1 * voice, sr)  # quiet speech, 20 dB under the generated voice, is accepted
    assert check_reference(path).notes == []
    # speech only after the first 10 s, S3Gen's whole prompt: refused (it passed, the whole file
    # measured, before 2026-12-04), and the same speech at the start is accepted
    room = np.random.default_rng(1).normal(0, 10 ** (-70 / 20), 12 * sr)
    sf.write(path, np.r_[room, 0.1 * voice[: 3 * sr]], sr)
    with pytest.raises(SourceError, match="silence in its first 10 s.*trim the silence") as e:
        check_reference(path)
    # what each part of the voice hears: Turbo's T3 prompt is its first 15 s (upstream ENC_COND_LEN)
    assert re.search(r"first 6 s.*Turbo's 15 s.*voice encoder", str(e.value))
    sf.write(path, np.r_[0.1 * voice[: 3 * sr], room], sr)
    assert check_reference(path).seconds == 15.0


def test_a_reference_too_short_to_make_is_refused_and_a_failed_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=r"0.3 s.*at least 0.5 s"):  # before: numpy's "high - low < 0"
        make_reference_wav(tmp_path / "short.wav", seconds=0.3)
    assert check_reference(make_reference_wav(tmp_path / "r.wav", seconds=0.5)).seconds == 0.5

    def disk_full(path: str, *args: object, **kwargs: object) -> None:
        Path(path).write_bytes(b"RIFF")
        raise OSError("No space left on device")

    monkeypatch.setattr(sf, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        make_reference_wav(tmp_path / "r.wav")
    assert [p.name for p in tmp_path.iterdir()] == ["r.wav"]  # before: the hidden partial file too


def test_a_generated_voice_is_made_once_a_process_and_kept_read_only(tmp_path: Path) -> None:
    """Every command without ``--reference`` writes the 10 s voice (0.2 s of arithmetic): its
    samples are made once a process for each length, rate and seed, the same file each time, and
    kept read-only so that no caller changes the next one's voice."""
    from tts_workbench.models import reference

    a, b = (
        make_reference_wav(tmp_path / "a.wav", seconds=1.0),
        make_reference_wav(tmp_path / "b.wav", seconds=1.0),
    )
    assert a.read_bytes() == b.read_bytes()
    assert make_reference_wav(tmp_path / "c.wav", seconds=1.0, seed=1).read_bytes() != a.read_bytes()
    kept = reference._voice_signal(1.0, 24_000, 0)
    assert kept is reference._voice_signal(1.0, 24_000, 0) and not kept.flags.writeable
    assert np.allclose(sf.read(a, dtype="float32")[0], kept, rtol=0, atol=1 / 2**15)  # 16-bit PCM


def test_a_generated_voice_is_kept_only_when_its_block_ends_without_an_error(tmp_path: Path) -> None:
    out = tmp_path / "out" / "reference.wav"
    with pytest.raises(ConfigError, match="refused"), generated_voice(out) as wav:
        assert check_reference(wav).seconds == 10.0  # a voice to prepare, outside the folder
        raise ConfigError("refused")
    assert not wav.exists() and not (tmp_path / "out").exists()
    with generated_voice(out) as wav:
        pass
    assert not wav.exists() and out.read_bytes() == make_reference_wav(tmp_path / "again.wav").read_bytes()


def test_check_folder_refuses_a_folder_it_cannot_make_without_making_one(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(NotADirectoryError) as below_a_file:
        check_folder(afile / "sub" / "out")
    assert below_a_file.value.filename == str(afile / "sub" / "out")
    with pytest.raises(FileExistsError):  # what mkdir raises for a file in the folder's place
        check_folder(afile)
    check_folder(tmp_path / "new" / "out")
    check_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("out", ["/proc", "/proc/new/out"])
def test_check_folder_refuses_a_folder_nobody_writes_in_root_neither(out: str) -> None:
    """/proc is a folder and os.access lets root write there, but no file can be made in it
    (before: ``load --url --out /proc`` ran every level, then lost them writing load.json)."""
    with pytest.raises(PermissionError, match=r"no file can be made in /proc \(") as refused:
        check_folder(out)  # (procfs answers ENOENT: "No such file or directory" of a folder that is there)
    assert refused.value.filename == out


def test_another_familys_s3gen_is_refused_where_upstream_loads_s3gen_strictly(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    multilingual = save_checkpoint(load_model("multilingual-tiny"), tmp_path / "multilingual")
    turbo = save_checkpoint(load_model("turbo-tiny"), tmp_path / "turbo")
    standard = save_checkpoint(tiny_tts, tmp_path / "standard")
    meanflow = load_file(str(turbo / "s3gen_meanflow.safetensors"))  # Turbo's S3Gen: more tensors
    torch.save(meanflow, multilingual / "s3gen.pt")
    # before: loaded as a multilingual model, the extra tensors dropped; upstream's mtl_tts raises
    with pytest.raises(SourceError, match=r"s3gen.pt in .* not this family's S3Gen: .*time_embed_mixer"):
        load_folder(multilingual)
    # the reverse: a standard S3Gen (no meanflow tensors) in a Turbo folder, which upstream's strict
    # load refuses too (before: "the file is incomplete; copy it again", which cannot fix it)
    (turbo / "s3gen_meanflow.safetensors").unlink()  # not overwritten: `meanflow` maps it
    shutil.copy(standard / "s3gen.safetensors", turbo / "s3gen_meanflow.safetensors")
    with pytest.raises(
        SourceError,
        match=r"s3gen_meanflow.safetensors in .* not this family's S3Gen: .*time_embed_mixer.*standard or "
        r"multilingual.*copy in the turbo model's own s3gen_meanflow.safetensors",
    ):
        load_folder(turbo)
    # upstream's standard from_local loads S3Gen with strict=False and takes Turbo's file, which then
    # runs 10 CFM steps without its time embedding mixer (before 2026-12-07 taken here too); spare
    # tensors of another kind are still taken, as upstream takes them
    own = load_file(str(standard / "s3gen.safetensors"))
    save_file(meanflow, str(standard / "s3gen.safetensors"))
    with pytest.raises(
        SourceError, match=r"s3gen.safetensors in .* not this family's S3Gen: .*time_embed_mixer"
    ):
        load_folder(standard)
    save_file({**own, "spare.buffer": torch.zeros(1)}, str(standard / "s3gen.safetensors"))
    assert type(load_folder(standard)) is ChatterboxTTS


def test_a_checkpoint_is_saved_in_a_float_dtype_given_as_a_dtype_or_its_name(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    for dtype in (torch.int8, torch.float64, "int8"):  # before: int8 wrote all-zero weights
        with pytest.raises(
            ConfigError, match=r"'(torch.)?(int8|float64)'.*use one of float32, float16, bfloat16"
        ):
            save_checkpoint(tiny_tts, tmp_path / "ckpt", dtype=dtype)
        assert list(tmp_path.iterdir()) == []  # refused before anything was written
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt", dtype="float16")  # before: "Invalid device string"
    assert json.loads((folder / METADATA_FILE).read_text())["dtypes"]["t3_cfg"] == "float16"
    w = "speech_head.weight"
    assert torch.equal(_params(load_folder(folder).t3)[w], _params(tiny_tts.t3)[w].half())


@pytest.mark.parametrize(
    ("source", "name", "damage"),
    [
        ("tiny", "conds.pt", "half"),  # before: OSError [Errno 22] Invalid argument
        ("tiny", "conds.pt", "empty"),  # before: a bare EOFError
        ("tiny", "tokenizer.json", "half"),  # before: "EOF while parsing a value"
        ("multilingual-tiny", "grapheme_mtl_merged_expanded_v1.json", "half"),
        ("turbo-tiny", "tokenizer.json", "half"),  # before: UnicodeDecodeError
        ("turbo-tiny", "tokenizer_config.json", "half"),  # before: JSONDecodeError
    ],
)
def test_a_damaged_voice_or_tokenizer_file_is_named_with_the_fix(
    tiny_tts: ChatterboxTTS, tmp_path: Path, source: str, name: str, damage: str
) -> None:
    folder = save_checkpoint(tiny_tts if source == "tiny" else load_model(source), tmp_path / "ckpt")
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2] if damage == "half" else b"")
    with pytest.raises(
        SourceError, match=rf"cannot read .*{re.escape(name)}.* in {re.escape(str(folder))}: .*copy"
    ):
        load_model(str(folder))


def test_weights_that_do_not_fit_say_why_and_that_the_metadata_is_missing(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    (folder / METADATA_FILE).unlink()  # a tiny model's weights, read as upstream's full-size model
    # before: only torch's first line, "Error(s) in loading state_dict for T3:"
    with pytest.raises(SourceError, match=r"full architecture: .*size mismatch for .*tts_workbench.json"):
        load_model(str(folder))


def test_speech_followed_by_quiet_room_tone_is_a_reference(reference_wav: Path, tmp_path: Path) -> None:
    voice, sr = sf.read(reference_wav)
    room = 10 ** (-70 / 20) * np.random.default_rng(0).standard_normal(9 * sr)  # -70 dBFS
    path = tmp_path / "tail.wav"
    sf.write(path, np.r_[voice[: int(0.9 * sr)], room], sr)
    assert check_reference(path).seconds == pytest.approx(9.9)  # before: refused as silence
    click = np.zeros_like(room)
    click[sr : sr + sr // 50] = 0.5 * np.random.default_rng(1).standard_normal(sr // 50)  # 20 ms
    for quiet in (room, room + click):  # the room tone alone, or with a click, is refused
        sf.write(path, quiet, sr)
        with pytest.raises(SourceError, match="is silence"):
            check_reference(path)


@pytest.mark.parametrize(
    ("source", "other", "lacks"),
    [
        # before: a bare AssertionError from upstream's `assert SOT in voc`
        ("tiny", "turbo-tiny", r"\[START\]"),
        ("multilingual-tiny", "turbo-tiny", r"\[START\]"),
        # before: loaded, and read the text with the other family's ids
        ("turbo-tiny", "tiny", r"<\|endoftext\|>"),
        ("turbo-tiny", "multilingual-tiny", r"<\|endoftext\|>"),
        ("multilingual-tiny", "tiny", r"language tokens \(\[ar\]"),
    ],
)
def test_another_familys_tokenizer_is_named_with_the_fix(
    tiny_tts: ChatterboxTTS, tmp_path: Path, source: str, other: str, lacks: str
) -> None:
    folder = save_checkpoint(tiny_tts if source == "tiny" else load_model(source), tmp_path / "ckpt")
    donor = save_checkpoint(tiny_tts if other == "tiny" else load_model(other), tmp_path / "other")
    family = checkpoints.folder_family(folder)[0]
    name = family.files[3]
    shutil.copy(donor / checkpoints.folder_family(donor)[0].files[3], folder / name)  # right name, wrong file
    with pytest.raises(
        SourceError,
        match=rf"{re.escape(name)} in {re.escape(str(folder))} has no {lacks}.*another family's tokenizer\? "
        rf"Copy in the {family.name} model's own {re.escape(name)}",
    ):
        load_model(str(folder))


@pytest.mark.parametrize(
    "content",
    [
        {"ve": torch.zeros(3)},  # no t3 or gen (before: KeyError: 't3')
        {"t3": {"embedding": torch.zeros(3)}, "gen": {}},  # not T3Cond's fields (before: TypeError)
        [torch.zeros(3)],  # no mapping at all (before: TypeError)
    ],
)
def test_a_voice_file_of_another_kind_is_named_with_the_fix(
    tiny_tts: ChatterboxTTS, tmp_path: Path, content: Any
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    torch.save(content, folder / "conds.pt")
    with pytest.raises(SourceError, match=rf"conds.pt in {re.escape(str(folder))} is not a .*Conditionals"):
        load_model(str(folder))


@pytest.mark.parametrize("family", [["standard"], {"name": "standard"}, 3])
def test_a_family_recorded_as_no_name_is_refused_naming_the_metadata(
    tiny_tts: ChatterboxTTS, tmp_path: Path, family: Any
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    meta_path = folder / METADATA_FILE
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"family": family}))
    # before: TypeError: unhashable type (a list or a mapping)
    with pytest.raises(
        SourceError, match=re.escape(str(meta_path)) + ".*unknown family.*save the model again"
    ):
        load_model(str(folder))


def test_a_turbo_folder_without_tokenizer_json_keeps_the_added_tokens(tmp_path: Path) -> None:
    turbo = load_model("turbo-tiny")
    turbo.tokenizer.add_tokens(["[laugh]", "[sigh]"])  # as upstream Turbo's 19 added tokens
    turbo.tokenizer.add_special_tokens({"additional_special_tokens": ["<|tag|>"]})
    text = "Hello [laugh] there <|tag|> ok"
    ids = turbo.tokenizer(text).input_ids
    folder = save_checkpoint(turbo, tmp_path / "turbo")
    (folder / "tokenizer.json").unlink()  # read from vocab.json, merges.txt and tokenizer_config.json
    back = load_folder(folder).tokenizer
    # before: 257 tokens, and [laugh] split into its characters
    assert len(back) == len(turbo.tokenizer) == 260 and back(text).input_ids == ids
    assert back.decode(ids, skip_special_tokens=True) == turbo.tokenizer.decode(ids, skip_special_tokens=True)
