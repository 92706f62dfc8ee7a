"""Turbo and Multilingual on the real upstream classes: sources, checkpoints, languages, the decode
loop's tokens against upstream ``inference_turbo``, and capped upstream generation."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from chatterbox import tts_turbo
from chatterbox.models.s3gen.const import S3GEN_SIL
from chatterbox.models.t3.inference.alignment_stream_analyzer import (
    LLAMA_ALIGNED_HEADS,
    AlignmentStreamAnalyzer,
)
from chatterbox.models.voice_encoder import VoiceEncoder
from chatterbox.mtl_tts import ChatterboxMultilingualTTS
from chatterbox.tts import ChatterboxTTS
from chatterbox.tts_turbo import ChatterboxTurboTTS
from safetensors.torch import save_file

from tts_workbench.core import families
from tts_workbench.core.errors import ConfigError, SourceError
from tts_workbench.core.families import FAMILIES, check_language, family_frame, family_of, spoken_languages
from tts_workbench.core.patching import shadow
from tts_workbench.models import builders
from tts_workbench.models.checkpoints import load_folder, save_checkpoint
from tts_workbench.models.frontends import CANGJIE_FILE
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.models.sources import load_model
from tts_workbench.models.vocode import s3gen_inference, tail_tokens
from tts_workbench.runtime.alignment import alignment
from tts_workbench.runtime.decode import (
    DEFAULT_MAX_CACHE_LEN,
    MIN_SPAN,
    DecodePlan,
    decode_blocks,
    prefill_length,
    t3_decode,
    text_tokens,
)
from tts_workbench.runtime.generation import generate, prepare_voice, token_cap
from tts_workbench.runtime.optimized import PerformanceOptimizedTTS, UpstreamTTS
from tts_workbench.runtime.precision import check_conditionals
from tts_workbench.runtime.streaming import (
    SAMPLES_PER_TOKEN,
    StreamConfig,
    one_shot,
    quality,
    stream_all,
    stream_tokens,
)

if TYPE_CHECKING:
    from conftest import Steer

N = 150


@pytest.fixture(scope="module")
def reference6(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_reference_wav(tmp_path_factory.mktemp("ref") / "r.wav", seconds=6.0))  # Turbo: > 5 s


@pytest.fixture(scope="module")
def turbo(reference6: str) -> ChatterboxTurboTTS:
    tts = load_model("turbo-tiny")
    prepare_voice(tts, reference6)
    return tts


@pytest.fixture(scope="module")
def multilingual(reference6: str) -> ChatterboxMultilingualTTS:
    tts = load_model("multilingual-tiny")
    prepare_voice(tts, reference6)
    return tts


def test_each_source_builds_its_upstream_class(
    turbo: ChatterboxTurboTTS, multilingual: ChatterboxMultilingualTTS
) -> None:
    assert type(turbo) is ChatterboxTurboTTS and family_of(turbo).name == "turbo"
    assert turbo.t3.is_gpt and turbo.s3gen.meanflow and not hasattr(turbo.t3.tfmr, "wte")
    assert type(multilingual) is ChatterboxMultilingualTTS and multilingual.t3.hp.is_multilingual
    # The built text front ends follow upstream's special ids.
    assert turbo.tokenizer.eos_token == "<|endoftext|>" == turbo.tokenizer.pad_token
    vocab = multilingual.tokenizer.tokenizer.get_vocab()
    assert vocab["[START]"] == 255 and vocab["[STOP]"] == 0 and "[fr]" in vocab
    assert max(vocab.values()) < 2454
    texts = {"fr": "Ça va ?", "es": "¿Qué tal? ¡Hola! «sí», 20 °C, 5 €", "ja": "はい。「いいえ」"}
    for language, text in texts.items():
        ids = multilingual.tokenizer.text_to_tokens(text, language_id=language)[0].tolist()
        # every grapheme known (before 2026-12-06 ¿ ¡ « » ° € 。 「 」 read as [UNK])
        assert ids[0] == vocab[f"[{language}]"] and vocab["[UNK]"] not in ids, text


def test_turbos_t3_settings_are_those_upstreams_from_local_builds_t3_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # builders._hp copies them (upstream sets them inline in from_local, no T3Config method has
    # them): a field that drifts from upstream's is caught here, at the T3 from_local builds.
    class Built(Exception):
        pass

    seen: list[Any] = []

    def recorded(hp: Any) -> None:
        seen.append(hp)
        raise Built

    save_file(VoiceEncoder().state_dict(), str(tmp_path / "ve.safetensors"))  # loaded before T3
    monkeypatch.setattr(tts_turbo, "T3", recorded)
    with pytest.raises(Built):
        ChatterboxTurboTTS.from_local(tmp_path, "cpu")
    assert vars(seen[0]) == vars(builders._hp("turbo"))


def _weights(tts: Any) -> dict[str, torch.Tensor]:
    """Every component's state (voice encoder, T3, S3Gen) by ``component.key``, without the
    ``patched`` copies upstream's T3 keeps of its own weights."""
    return {f"{name}.{k}": v for name, module in families.components(tts).items()
            for k, v in module.state_dict().items() if not k.startswith("patched")}  # fmt: skip


@pytest.mark.parametrize("name", ["turbo", "multilingual"])
def test_checkpoint_round_trip_in_the_upstream_layout(
    name: str, turbo: ChatterboxTurboTTS, multilingual: ChatterboxMultilingualTTS, tmp_path: Path
) -> None:
    tts = turbo if name == "turbo" else multilingual
    folder = save_checkpoint(tts, tmp_path / name)
    assert all((folder / f).exists() for f in FAMILIES[name].files)
    assert json.loads((folder / "tts_workbench.json").read_text())["family"] == name
    back = load_folder(folder)
    assert type(back) is type(tts)
    # every component's weights (T3's alone were compared: a lost S3Gen or voice encoder passed)
    theirs = _weights(back)
    for k, v in _weights(tts).items():
        assert torch.equal(v, theirs[k]) and v.dtype == theirs[k].dtype, k
    assert back.conds is not None and torch.equal(back.conds.t3.speaker_emb, tts.conds.t3.speaker_emb)


def test_a_turbo_folder_names_a_tokenizer_class_every_transformers_reads(
    turbo: ChatterboxTurboTTS, tmp_path: Path
) -> None:
    folder = save_checkpoint(turbo, tmp_path / "turbo")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # transformers 5 writes its generic TokenizersBackend, unknown to upstream's transformers 4.46
    assert config["tokenizer_class"] == "GPT2Tokenizer" and "backend" not in config
    vocab = json.loads((folder / "vocab.json").read_text())
    assert len(vocab) == turbo.tokenizer.vocab_size and (folder / "merges.txt").exists()
    text = "Hello there, how are you?"
    assert load_folder(folder).tokenizer(text).input_ids == turbo.tokenizer(text).input_ids


def test_a_folder_of_one_family_is_refused_as_another(turbo: ChatterboxTurboTTS, tmp_path: Path) -> None:
    folder = save_checkpoint(turbo, tmp_path / "turbo")
    with pytest.raises(
        SourceError, match="holds a turbo model .*t3_turbo_v1.safetensors.*not a standard one"
    ):
        load_folder(folder, family="standard")
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(SourceError, match="turbo model folder .* is missing tokenizer_config.json"):
        load_folder(folder)


def test_the_family_table_has_a_row_per_family_with_its_own_sampling_defaults() -> None:
    frame = family_frame().set_index("family")
    assert list(frame.index) == list(FAMILIES)
    assert frame.loc["turbo", "t3_call"] == "T3.inference_turbo" and not frame.loc["turbo", "guidance"]
    assert "repetition_penalty=2 " in frame.loc["multilingual", "sampling"]  # 1.2 in the other two
    assert "top_k=1000" in frame.loc["turbo", "sampling"]


def test_languages_are_checked_with_the_fix() -> None:
    assert check_language("FR") == "fr"
    with pytest.raises(ConfigError, match="unsupported language 'xx'.*fr \\(French\\)"):
        check_language("xx")
    with pytest.raises(ConfigError, match="Japanese \\(ja\\) text needs the optional package 'pykakasi'"):
        check_language("ja")


def test_an_argument_no_sampling_takes_is_refused_by_name(tiny_tts: ChatterboxTTS) -> None:
    # Every keyword past the named ones was read as a sampling setting with float(): language="fr"
    # (the multilingual model's is language_id) failed with "could not convert string to float:
    # 'fr'", naming neither the argument nor what is taken.
    refusal = "unknown sampling argument 'language' for the standard model: use cfg_weight, min_p, "
    with PerformanceOptimizedTTS(tiny_tts, policy="float32") as opt:
        with pytest.raises(ConfigError, match=refusal + "repetition_penalty, temperature, top_p$"):
            opt.generate("Bonjour.", language="fr", max_new_tokens=4)
        with pytest.raises(ConfigError, match="unknown sampling argument 'flow'"):
            opt.generate("Hello.", flow="eager", max_new_tokens=4)  # generate_stream's, not generate's
    # the wrapper's option, refused by the baseline as such (test_optimized: every one of them)
    with pytest.raises(ConfigError, match=r"\(UpstreamTTS, optimize=False\) .* takes no decode: leave"):
        next(UpstreamTTS(tiny_tts).generate_stream("Hello.", decode="static", max_new_tokens=4))
    with pytest.raises(ConfigError, match="temperature must be a number, got 'x'"):
        FAMILIES["standard"].sampling_with({"temperature": "x"})
    with pytest.raises(ConfigError, match="top_k must be a number, got None"):
        FAMILIES["turbo"].sampling_with({"top_k": None})


@pytest.mark.parametrize(
    ("model", "given", "typed"),
    [
        ("turbo", {"temperature": 2, "top_k": 50.0}, {"temperature": 2.0, "top_k": 50}),
        ("tiny_tts", {"temperature": "0.5", "cfg_weight": "0.5"}, {"temperature": 0.5, "cfg_weight": 0.5}),
    ],
)
def test_the_baseline_hands_upstream_the_sampling_values_it_checked(
    request: pytest.FixtureRequest, model: str, given: dict[str, Any], typed: dict[str, Any]
) -> None:
    # Before, generate checked the converted values (sampling_with) and handed upstream the caller's:
    # Turbo's temperature 2 and top_k 50.0 failed in transformers' warpers ("has to be a strictly
    # positive float"), a string temperature in torch, where the optimized wrapper ran them all.
    tts = request.getfixturevalue(model)
    as_given = generate(tts, "Hi.", max_new_tokens=4, seed=0, **given)
    assert as_given.speech_tokens == generate(tts, "Hi.", max_new_tokens=4, seed=0, **typed).speech_tokens


@pytest.mark.parametrize("upstream", [ChatterboxTTS, ChatterboxTurboTTS, ChatterboxMultilingualTTS])
def test_a_subclass_of_an_upstream_class_is_of_its_family(upstream: type) -> None:
    # Before, only the upstream class itself was: a subclass was "not a Chatterbox model".
    mine = type("Mine", (upstream,), {})
    assert family_of(mine.__new__(mine)) is next(f for f in FAMILIES.values() if f.model_class is upstream)
    with pytest.raises(ConfigError, match="object is not a Chatterbox model"):
        family_of(object())


def test_a_subclassed_model_generates_as_its_upstream_class(tiny_tts: ChatterboxTTS) -> None:
    class Mine(ChatterboxTTS):
        pass

    upstream = generate(tiny_tts, "Hi.", max_new_tokens=4, seed=0)
    tiny_tts.__class__ = Mine
    try:
        assert family_of(tiny_tts).name == "standard"
        assert generate(tiny_tts, "Hi.", max_new_tokens=4, seed=0).speech_tokens == upstream.speech_tokens
    finally:
        tiny_tts.__class__ = ChatterboxTTS


def test_turbo_takes_the_arguments_upstream_ignores_unless_asked_not_to() -> None:
    # Upstream Turbo generate takes cfg_weight and min_p and ignores them; the stream engine
    # refuses them (a caller would expect them to work), with the reason.
    turbo = FAMILIES["turbo"]
    assert turbo.sampling_with({"cfg_weight": 0.5, "min_p": 0.1})[0] == 0.0
    with pytest.raises(ConfigError, match="'cfg_weight', 'min_p' for the turbo model.*upstream ignores them"):
        turbo.check_sampling_keys({"min_p": 0.1, "cfg_weight": 0.5}, ignored=False)
    with pytest.raises(ConfigError, match="'exaggeration'.*prepare_voice"):
        FAMILIES["multilingual"].check_sampling_keys({"exaggeration": 1.0})


def test_chinese_without_upstreams_cangjie_table_is_refused(
    multilingual: ChatterboxMultilingualTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Upstream's MTLTokenizer fetches the table from the hub, logs a failure and passes the
    # characters through unencoded: other tokens than upstream's online, silently.
    monkeypatch.delitem(families.LANGUAGE_PACKAGES, "zh")  # as if the segmenter were installed
    assert not multilingual.tokenizer.cangjie_converter.word2cj  # offline here: not loaded
    with pytest.raises(ConfigError, match="Chinese \\(zh\\) text needs upstream's Cangjie table"):
        text_tokens(multilingual, "你好。", language_id="zh")


def test_a_chinese_table_beside_the_vocabulary_is_read(tmp_path: Path) -> None:
    """Upstream's MTLTokenizer looks for Cangjie5_TC.json only in a hub cache laid out inside the
    tokenizer's folder (``hf_hub_download(cache_dir=...)``): a table beside the vocabulary, in a
    model folder or the snapshot from_pretrained filled, was never read offline, and Chinese
    was refused with real weights. Two entries in upstream's format ("word<TAB>code")."""
    folder = save_checkpoint(load_model("multilingual-tiny"), tmp_path / "ml")
    (folder / CANGJIE_FILE).write_text(json.dumps(["你\tonf", "好\tvnd", "妳\tonf"]), encoding="utf-8")
    converter = load_folder(folder).tokenizer.cangjie_converter
    assert converter.word2cj == {"你": "onf", "好": "vnd", "妳": "onf"}
    assert converter.cj2word == {"onf": ["你", "妳"], "vnd": ["好"]}
    # multilingual-pretrained: the table in the hub cache's snapshot, where from_pretrained put it
    import huggingface_hub

    asked: list[tuple[str, str]] = []

    def cached(repo: str, name: str) -> str:
        asked.append((repo, name))
        return str(folder / CANGJIE_FILE)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            ChatterboxMultilingualTTS, "from_pretrained", lambda _device: load_model("multilingual-tiny")
        )
        patch.setattr(huggingface_hub, "try_to_load_from_cache", cached)
        tts = load_model("multilingual-pretrained")
    assert (
        asked == [("ResembleAI/chatterbox", CANGJIE_FILE)]
        and tts.tokenizer.cangjie_converter.word2cj["好"] == "vnd"
    )
    # a damaged table is named (not half read, not a raw error blamed on the vocabulary)
    for damaged in (b'["\xe4\xbd', b'["no tab here"]', b"[5]"):
        (folder / CANGJIE_FILE).write_bytes(damaged)
        with pytest.raises(SourceError, match=r"Cangjie5_TC.json is not upstream's Cangjie table"):
            load_folder(folder)


def test_the_languages_a_model_speaks_here_leave_out_what_this_machine_lacks(
    multilingual: ChatterboxMultilingualTTS, turbo: ChatterboxTurboTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a server lists in GET /v1/models: the English-only families speak English; the
    multilingual model each language whose front end runs here (none of the four optional packages
    is installed in this lock, and Chinese needs upstream's table, offline here)."""
    assert spoken_languages(turbo) == ["en"]
    spoken = spoken_languages(multilingual)
    assert spoken == [c for c in families.SUPPORTED_LANGUAGES if c not in families.LANGUAGE_PACKAGES]
    assert len(spoken) == 19 and {"en", "fr", "de"} <= set(spoken)
    monkeypatch.setattr(families, "LANGUAGE_PACKAGES", {})  # as if every package were installed
    assert "ja" in spoken_languages(multilingual)
    # Chinese needs upstream's table too, which MTLTokenizer fetches from the hub (offline here)
    has_table = bool(multilingual.tokenizer.cangjie_converter.word2cj)
    assert ("zh" in spoken_languages(multilingual)) == has_table
    with pytest.raises(ConfigError, match="language_id must be a language code"):  # read as en before
        text_tokens(multilingual, "Hello.", language_id="")


def test_turbo_refuses_a_short_reference(turbo: ChatterboxTurboTTS, tmp_path: Path) -> None:
    short = make_reference_wav(tmp_path / "short.wav", seconds=3.0)
    with pytest.raises(SourceError, match="longer than 5 s"):
        prepare_voice(turbo, str(short))


@pytest.fixture(scope="module")
def turbo_upstream(turbo: ChatterboxTurboTTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream ``inference_turbo``'s tokens for a seed (and the text they were sampled for)."""
    text = text_tokens(turbo, "Hello there, this is a turbo test.")
    torch.manual_seed(7)
    return text, turbo.t3.inference_turbo(t3_cond=turbo.conds.t3, text_tokens=text, max_gen_len=N - 1)


# compiled: a cold compile of Turbo's step of its own (~20 s), in the integration tier
@pytest.mark.parametrize("step", ["eager", "static", pytest.param("compiled", marks=pytest.mark.integration)])
def test_turbo_decode_samples_exactly_inference_turbo_tokens(
    turbo: ChatterboxTurboTTS, turbo_upstream: tuple[torch.Tensor, torch.Tensor], step: str
) -> None:
    text, upstream = turbo_upstream
    assert text.size(0) == 1  # no guidance batch
    torch.manual_seed(7)
    # prefill (186 positions) + N fit one span of 384 slots: the compiled step is one graph
    plan = DecodePlan.plain(turbo.t3, step=step, max_cache_len=384)
    ours = t3_decode(turbo.t3, turbo.conds.t3, text, max_new_tokens=N, plan=plan)
    assert ours.step_mode == step and upstream.shape == ours.tokens.shape == (1, N)
    assert torch.equal(upstream, ours.tokens)


def test_turbo_static_step_crosses_a_span_with_inference_turbos_tokens(
    turbo: ChatterboxTurboTTS, turbo_upstream: tuple[torch.Tensor, torch.Tensor]
) -> None:
    # With the default cache the step attends to 256 slots, then 512 once prefill (186) and tokens
    # pass 256 (decode.MIN_SPAN): the test above fits one span of 384, so no Turbo test crossed one.
    text, upstream = turbo_upstream
    torch.manual_seed(7)
    plan = DecodePlan.plain(turbo.t3, step="static", max_cache_len=DEFAULT_MAX_CACHE_LEN)
    prefill = prefill_length(turbo, "Hello there, this is a turbo test.")  # the fixture's text
    assert prefill < MIN_SPAN < prefill + N < DEFAULT_MAX_CACHE_LEN
    ours = t3_decode(turbo.t3, turbo.conds.t3, text, max_new_tokens=N, plan=plan)
    assert ours.step_mode == "static" and torch.equal(upstream, ours.tokens)


@pytest.mark.parametrize("step", ["eager", "static"])
def test_turbo_goes_on_after_a_first_token_that_is_the_stop_token(
    turbo: ChatterboxTurboTTS, step: str, steer: type[Steer]
) -> None:
    # inference_turbo checks for the stop token in its loop only: a first token (sampled from
    # the prefill's logits) that is the stop token is fed back and generation goes on.
    text, stop = text_tokens(turbo, "Hello there."), turbo.t3.hp.stop_speech_token
    with shadow(turbo.t3.speech_head, "forward", steer({1: stop})):
        torch.manual_seed(7)
        upstream = turbo.t3.inference_turbo(t3_cond=turbo.conds.t3, text_tokens=text, max_gen_len=7)
    with shadow(turbo.t3.speech_head, "forward", steer({1: stop})):
        torch.manual_seed(7)
        plan = DecodePlan.plain(turbo.t3, step=step, max_cache_len=384)
        ours = t3_decode(turbo.t3, turbo.conds.t3, text, max_new_tokens=8, plan=plan)
    assert upstream[0, 0] == stop and upstream.size(1) == 8
    assert torch.equal(ours.tokens, upstream) and not ours.stopped


def test_capped_upstream_generation_of_both_families(
    turbo: ChatterboxTurboTTS, multilingual: ChatterboxMultilingualTTS
) -> None:
    t = generate(turbo, "Turbo speaks.", max_new_tokens=12)
    assert len(t.speech_tokens) == 12 and t.stopped_by == "token cap" and "t3.prefill" in t.seconds
    m = generate(multilingual, "Bonjour à tous.", max_new_tokens=12, language_id="fr")
    assert m.stopped_by == "token cap" and len(m.speech_tokens) + m.invalid_tokens >= 1
    assert m.wav.size > 0 and t.wav.size > 0
    with pytest.raises(ConfigError, match="unsupported language"):
        generate(multilingual, "Hola.", max_new_tokens=4, language_id="xx")


def test_turbo_buffered_stream_vocodes_every_token_once(turbo: ChatterboxTurboTTS) -> None:
    config = StreamConfig("buffered", first_window_s=0.4, window_s=1.0)
    results = {}
    for strategy in ("buffered", "naive"):
        torch.manual_seed(3)
        cfg = config if strategy == "buffered" else StreamConfig("naive")
        wav, state = stream_all(turbo, "Streaming Turbo, window by window.", cfg, max_new_tokens=55)
        reference = one_shot(turbo, state, cfg)
        assert state.tokens[-3:] == tail_tokens(turbo.s3gen) == [S3GEN_SIL] * 3  # as upstream Turbo
        assert stream_tokens(turbo, "Streaming Turbo, window by window.", max_new_tokens=55) == state.tokens
        assert len(wav) == len(state.tokens) * SAMPLES_PER_TOKEN == len(reference)
        results[strategy] = (state, quality(wav, reference, state))
    state, buffered = results["buffered"]
    assert state.report.summary()["s3gen_calls"] == 3 and state.t3.steps == 55
    # Observed: 14.5 dB buffered vs one-shot (2 meanflow steps; the standard model gives ~22 dB).
    assert buffered["snr_db"] >= 12.0 and buffered["snr_db"] > results["naive"][1]["snr_db"]
    assert buffered["seam_max_over_median"] <= 2 * buffered["ordinary_max_over_median"]


def test_the_wrapper_runs_each_family_and_gives_the_model_back(
    turbo: ChatterboxTurboTTS, multilingual: ChatterboxMultilingualTTS, reference6: str
) -> None:
    for tts, kw in ((turbo, {}), (multilingual, {"language_id": "de"})):
        before = {k: v.clone() for k, v in _weights(tts).items()}  # S3Gen's flow is cast too
        with PerformanceOptimizedTTS(tts, policy="bfloat16") as opt:
            opt.prepare_conditionals(reference6)
            wav = opt.generate("Guten Tag.", max_new_tokens=10, seed=0, **kw)
            tail = len(tail_tokens(tts.s3gen))
            assert wav.shape[1] == (10 - opt.last.invalid_tokens + tail) * SAMPLES_PER_TOKEN
            assert opt.configuration()["family"] == family_of(tts).name
            chunks = [c for c, _ in opt.generate_stream("Guten Tag.", max_new_tokens=12, **kw)]
            assert sum(len(c) for c in chunks) % SAMPLES_PER_TOKEN == 0
        after = _weights(tts)
        assert all(torch.equal(v, after[k]) and v.dtype == after[k].dtype for k, v in before.items())


def test_conditionals_of_another_family_are_refused(
    turbo: ChatterboxTurboTTS, multilingual: ChatterboxMultilingualTTS
) -> None:
    with pytest.raises(
        SourceError, match="this turbo model .*made by the multilingual family's prepare_conditionals"
    ):
        check_conditionals(multilingual.conds, turbo)


def _multilingual_text(tts: ChatterboxMultilingualTTS) -> torch.Tensor:
    return text_tokens(tts, "Bonjour à tous, ceci est un essai.", 0.5, "fr")


def test_multilingual_decode_samples_upstreams_tokens_and_gives_the_model_back(
    multilingual: ChatterboxMultilingualTTS,
) -> None:
    _pristine(multilingual)
    t3, text = multilingual.t3, _multilingual_text(multilingual)
    config, attn = t3.tfmr.config, t3.tfmr.layers[9].self_attn

    def state() -> tuple[Any, ...]:
        return (config._attn_implementation, config.output_attentions, _spies(attn), *_captures(t3.tfmr))

    before = state()
    assert before == ("sdpa", False, 0, 0, False)
    torch.manual_seed(7)
    ours = t3_decode(t3, multilingual.conds.t3, text, max_new_tokens=N, plan=DecodePlan.plain(t3))
    # Upstream's analyzer switched attention to eager and added hooks for the run, and asking for
    # attentions made transformers hook every layer (before 2026-12-05 for good); all undone.
    assert state() == before
    torch.manual_seed(7)
    upstream = t3.inference(t3_cond=multilingual.conds.t3, text_tokens=text, max_new_tokens=N, top_p=0.95)
    assert torch.equal(upstream, ours.tokens)
    # Upstream leaves them changed (three more hooks every generation, transformers' for good).
    assert config._attn_implementation == "eager" and _spies(attn) > before[2] and _captures(t3.tfmr)[1]


def _pristine(tts: ChatterboxMultilingualTTS) -> tuple[Any, ...]:
    """Undo what upstream's own generation left on the shared model (eager attention, attentions
    on, its analyzer's spies, transformers' capture hooks), so a test's ``before`` is the loaded
    model's state whatever ran earlier."""
    tfmr = tts.t3.tfmr
    config = tfmr.config
    config._attn_implementation, config.output_attentions = "sdpa", False
    for m in tfmr.modules():
        m._forward_hooks.clear()
    vars(tfmr).pop("_output_capturing_hooks_installed", None)
    attns = [tfmr.layers[layer].self_attn for layer, _ in LLAMA_ALIGNED_HEADS]
    state = (config._attn_implementation, config.output_attentions, *map(_spies, attns))
    assert state == ("sdpa", False, 0, 0, 0) and _captures(tfmr) == (0, False)
    return state


def _spies(attn: torch.nn.Module) -> int:
    """Forward hooks on an attention module but transformers' capture hooks (``_captures``)."""
    hooks = attn._forward_hooks.values()
    return sum(hook.__module__ != "transformers.utils.output_capturing" for hook in hooks)


def _captures(tfmr: torch.nn.Module) -> tuple[int, bool]:
    """transformers' capture hooks on the backbone's modules, and its flag that they are there:
    it installs them the first time attentions are asked of the model. Inactive unless outputs
    are collected, but every call of a hooked module takes nn.Module's slower path."""
    hooks = [h for m in tfmr.modules() for h in m._forward_hooks.values()]
    n = sum(hook.__module__ == "transformers.utils.output_capturing" for hook in hooks)
    return n, bool(getattr(tfmr, "_output_capturing_hooks_installed", False))


def test_two_upstream_multilingual_generates_in_two_threads_take_turns(
    multilingual: ChatterboxMultilingualTTS,
) -> None:
    """Upstream T3.inference keeps its analyzer in t3.patched_model, one per model: before
    2026-12-04 two upstream generates at once replaced each other's and one failed inside it
    (a RuntimeError from torch.stack). Now they take turns and each gives its solo tokens."""
    texts = {1: ("Bonjour à tous, ceci est un essai.", "fr"), 2: ("Hallo zusammen.", "de")}

    def speak(seed: int) -> list[int]:
        text, language = texts[seed]
        return generate(multilingual, text, max_new_tokens=30, seed=seed, language_id=language).speech_tokens

    solo = {seed: speak(seed) for seed in texts}
    together, errors, start = {}, [], threading.Barrier(2)

    def run(seed: int) -> None:
        start.wait(timeout=30)
        try:
            together[seed] = speak(seed)
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and together == solo, errors


def test_two_multilingual_generations_at_once_each_feed_their_own_analyzer(
    multilingual: ChatterboxMultilingualTTS,
) -> None:
    # Two streams read in turns from one thread: A starts, B starts, A ends, B ends. Upstream's
    # spies are hooks every forward fires: the first to end took the other's away, and the last
    # "restored" the eager attention it found when it started.
    t3, text = multilingual.t3, _multilingual_text(multilingual)
    config = t3.tfmr.config
    attns = [t3.tfmr.layers[layer].self_attn for layer, _ in LLAMA_ALIGNED_HEADS]

    def state() -> tuple[Any, ...]:
        return (
            config._attn_implementation,
            config.output_attentions,
            *map(_spies, attns),
            *_captures(t3.tfmr),
        )

    before = _pristine(multilingual) + _captures(t3.tfmr)
    assert state() == before == ("sdpa", False, 0, 0, 0, 0, False)

    def blocks(seed: int) -> Iterator[torch.Tensor]:
        return decode_blocks(
            t3, multilingual.conds.t3, text, max_new_tokens=12, stop_check_every=2,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    solo = [torch.cat(list(blocks(seed)), dim=1) for seed in (0, 1)]
    a, b = blocks(0), blocks(1)
    got: list[list[torch.Tensor]] = [[next(a)], [next(b)]]
    got[0] += list(a)
    assert config._attn_implementation == "eager"  # B still runs: its analyzer reads attention
    got[1] += list(b)
    for blocks_, alone in zip(got, solo, strict=True):
        assert torch.equal(torch.cat(blocks_, dim=1), alone)
    assert state() == before

    # Each generation's forwards feed its own analyzer only, whichever ended first.
    x = torch.randn(1, 5, config.hidden_size)
    with alignment([t3.tfmr], (1, 3), 0) as first, alignment([t3.tfmr], (1, 3), 0) as second:
        with torch.inference_mode(), first.watching():
            t3.tfmr(inputs_embeds=x)
        assert all(attn is not None for attn in first.analyzer.last_aligned_attns)
        assert all(attn is None for attn in second.analyzer.last_aligned_attns)
    assert state() == before


def test_an_analyzer_that_fails_to_start_leaves_the_model_as_it_was(
    multilingual: ChatterboxMultilingualTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its third spy fails; meanwhile a hook not upstream's (as transformers installs on another
    # thread's first forward with attentions) arrives, and stays.
    tfmr = multilingual.t3.tfmr
    config, attns = tfmr.config, [tfmr.layers[layer].self_attn for layer, _ in LLAMA_ALIGNED_HEADS]
    _pristine(multilingual)
    before = (config._attn_implementation, config.output_attentions, *map(_spies, attns))
    assert before == ("sdpa", False, 0, 0, 0)
    real, calls = AlignmentStreamAnalyzer._add_attention_spy, [0]

    def failing(self: AlignmentStreamAnalyzer, tfmr: Any, *a: Any) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("spy failed (made on purpose)")
        real(self, tfmr, *a)
        if calls[0] == 2:
            foreign.append(attns[0].register_forward_hook(lambda *_: None))

    foreign: list[Any] = []
    monkeypatch.setattr(AlignmentStreamAnalyzer, "_add_attention_spy", failing)
    with pytest.raises(RuntimeError, match="made on purpose"), alignment([tfmr], (1, 3), 0):
        pass
    after = (config._attn_implementation, config.output_attentions, *map(_spies, attns))
    foreign[0].remove()
    assert after[:2] == before[:2] and after[2] == before[2] + 1 and after[3:] == before[3:]


def test_a_cache_sized_by_prefill_length_fits_a_multilingual_generation(
    multilingual: ChatterboxMultilingualTTS,
) -> None:
    # As the bench sizes it, exactly: the language tag (English by default) must be counted.
    text, n = "Hello there.", 6
    with PerformanceOptimizedTTS.from_model(multilingual, decode="static") as opt:
        opt.set_max_cache_len(opt.prefill_length(text) + n)
        opt.generate(text, max_new_tokens=n)
        assert opt.last.tokens == n


def test_closing_the_wrapper_mid_stream_gives_the_multilingual_model_back(
    multilingual: ChatterboxMultilingualTTS,
) -> None:
    # Before, a stream still open held the analyzer's eager attention and spies on the model
    # after close(), until it was read again or collected.
    config, text = multilingual.t3.tfmr.config, "Bonjour, ceci est un essai."
    attention = multilingual.t3.tfmr.layers[9].self_attn

    def state() -> tuple[Any, ...]:
        return config._attn_implementation, config.output_attentions, len(attention._forward_hooks)

    _pristine(multilingual)
    with PerformanceOptimizedTTS.from_model(multilingual, dtype="float32", decode="eager") as opt:
        list(opt.generate_stream(text, max_new_tokens=30, language_id="fr"))
    before = state()
    assert before == ("sdpa", False, 0) and _captures(multilingual.t3.tfmr) == (0, False)  # given back
    opt = PerformanceOptimizedTTS.from_model(multilingual, dtype="float32", decode="eager")
    chunks = opt.generate_stream(text, max_new_tokens=60, language_id="fr")
    next(chunks)
    assert state() != before  # the analyzer at work
    opt.close()
    assert state() == before
    with pytest.raises(ConfigError, match="was closed"):
        next(chunks)


class _Biased(torch.nn.Module):
    """A speech head that always prefers one token: a repetition the analyzer must stop."""

    def __init__(self, head: torch.nn.Module, token: int) -> None:
        super().__init__()
        self.head = head
        self.bias = torch.zeros(head.out_features)
        self.bias[token] = 100.0

    @property
    def weight(self) -> torch.Tensor:  # read by the loops for the head's device
        return self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + self.bias


def test_the_alignment_analyzer_forces_the_stop_as_upstream(multilingual: ChatterboxMultilingualTTS) -> None:
    t3, text = multilingual.t3, _multilingual_text(multilingual)
    head = t3.speech_head
    t3.speech_head = _Biased(head, 1234)
    try:
        runs = {}
        for step in ("eager", "static"):
            torch.manual_seed(7)
            plan = DecodePlan.plain(t3, step=step, max_cache_len=512)
            runs[step] = t3_decode(
                t3, multilingual.conds.t3, text, max_new_tokens=20, plan=plan, stop_check_every=1
            )
        torch.manual_seed(7)
        upstream = t3.inference(t3_cond=multilingual.conds.t3, text_tokens=text, max_new_tokens=20)
    finally:
        t3.speech_head = head
        for a in (t3.tfmr.layers[i].self_attn for i in (9, 12, 13)):
            a._forward_hooks.clear()
        t3.tfmr.config._attn_implementation, t3.tfmr.config.output_attentions = "sdpa", False
    stop = t3.hp.stop_speech_token
    assert upstream[0].tolist() == [1234, 1234, stop]  # two repeats: upstream forces the stop token
    assert torch.equal(runs["eager"].tokens, upstream) and runs["eager"].stopped
    # The static step has no attention weights for the analyzer: it does not stop (README).
    assert not runs["static"].stopped and runs["static"].tokens.size(1) == 20


def test_generate_prepares_a_turbo_reference_as_prepare_voice_does(
    turbo: ChatterboxTurboTTS, reference6: str, tmp_path: Path
) -> None:
    # Before, upstream generate prepared it itself: Turbo's float64 loudness gain failed in the
    # S3 tokenizer ("expected scalar type Double but found Float"), and a short reference met
    # upstream's assert, not the SourceError prepare_voice gives.
    conds = turbo.conds
    try:
        r = generate(turbo, "Turbo speaks.", max_new_tokens=6, audio_prompt_path=reference6)
        assert len(r.speech_tokens) == 6 and turbo.conds is not conds
        for key in ("prompt_token", "prompt_feat", "embedding"):  # the voice prepare_voice made
            assert torch.equal(turbo.conds.gen[key], conds.gen[key])
        short = make_reference_wav(tmp_path / "short.wav", seconds=3.0)
        with pytest.raises(SourceError, match="longer than 5 s"):
            generate(turbo, "Turbo speaks.", max_new_tokens=6, audio_prompt_path=str(short))
    finally:
        turbo.conds = conds


def test_multilingual_generate_gives_the_model_back_and_keeps_upstreams_tokens(reference6: str) -> None:
    # A fresh model, no _pristine: upstream generate left its analyzer's three spies on the
    # attention modules after every call (each copying attention to the host at every step of
    # every later generation), and the backbone in eager attention with attentions on.
    tts = load_model("multilingual-tiny")
    prepare_voice(tts, reference6)
    t3 = tts.t3
    config, attns = t3.tfmr.config, [t3.tfmr.layers[layer].self_attn for layer, _ in LLAMA_ALIGNED_HEADS]

    def state() -> tuple[Any, ...]:
        return (
            config._attn_implementation,
            config.output_attentions,
            *map(_spies, attns),
            *_captures(t3.tfmr),
        )

    assert state() == ("sdpa", False, 0, 0, 0, 0, False)
    runs = [generate(tts, "Bonjour.", max_new_tokens=8, seed=seed, language_id="fr") for seed in (0, 1)]
    assert state() == ("sdpa", False, 0, 0, 0, 0, False)  # after every call, not only the first
    assert runs[0].speech_tokens != runs[1].speech_tokens
    # The analyzer still steers upstream's generation: a repetition is stopped (as upstream's own).
    head, stop = t3.speech_head, t3.hp.stop_speech_token
    t3.speech_head = _Biased(head, 1234)
    try:
        r = generate(tts, "Bonjour à tous, ceci est un essai.", max_new_tokens=20, language_id="fr")
    finally:
        t3.speech_head = head
    assert r.speech_tokens == [1234, 1234, stop] and r.stopped_by == "stop token"
    assert state() == ("sdpa", False, 0, 0, 0, 0, False)
    # The tokens of upstream's own analyzer, for the seed (which then leaks, on this test's model).
    with token_cap(tts, 8) as seen:
        torch.manual_seed(0)
        tts.generate("Bonjour.", language_id="fr")
    assert seen["tokens"][0].tolist() == runs[0].speech_tokens
    assert state()[:5] == ("eager", True, 1, 1, 1) and state()[6]


def test_both_pipelines_prepare_a_turbo_reference_as_upstream_generate_does(
    turbo: ChatterboxTurboTTS, reference6: str
) -> None:
    # Before: the baseline prepared it with loudness normalised whatever it was asked (and the
    # standard model's exaggeration default), and the wrapper failed on norm_loudness with a
    # TypeError after preparing the voice.
    conds = turbo.conds
    try:
        prepare_voice(turbo, reference6, 0.0, norm_loudness=False)
        want = turbo.conds.gen["embedding"]
        prepare_voice(turbo, reference6)
        assert not torch.equal(turbo.conds.gen["embedding"], want)  # the switch changes the voice
        with PerformanceOptimizedTTS(turbo, policy="float32", decode="eager") as opt:
            for pipeline in (UpstreamTTS(turbo), opt):
                turbo.conds = conds
                pipeline.generate("Turbo speaks.", reference6, max_new_tokens=6, norm_loudness=False)
                assert torch.equal(turbo.conds.gen["embedding"], want), type(pipeline).__name__
    finally:
        turbo.conds = conds


def test_both_pipelines_count_turbos_stop_token_as_a_sampled_token(
    turbo: ChatterboxTurboTTS, steer: type[Steer]
) -> None:
    # inference_turbo drops the stop token it sampled; the wrapper's count includes it: the
    # baseline's tokens (and the bench's tokens/s) were one lower for the same sampling.
    stop = turbo.t3.hp.stop_speech_token
    counts = []
    with PerformanceOptimizedTTS(turbo, policy="float32", decode="eager") as opt:
        for pipeline in (UpstreamTTS(turbo), opt):
            with shadow(turbo.t3.speech_head, "forward", steer({6: stop})):
                pipeline.generate("Turbo speaks.", max_new_tokens=20, seed=0)
            counts.append((pipeline.last.tokens, pipeline.last.stopped_by))
    assert counts[0] == counts[1] == (6, "stop token")


def test_turbos_s3gen_with_exact_ids_matches_upstream(turbo: ChatterboxTurboTTS) -> None:
    # Upstream's meanflow flow_inference draws its start noise before the flow runs; without
    # that draw the seeded wrapper's Turbo audio was not upstream's (max diff ~0.015).
    tokens = torch.arange(40) * 150 % 6561
    gen = dict(turbo.conds.gen)
    torch.manual_seed(5)
    want, _ = turbo.s3gen.inference(speech_tokens=tokens, ref_dict=dict(gen), n_cfm_timesteps=2)
    torch.manual_seed(5)
    assert torch.equal(s3gen_inference(turbo.s3gen, tokens, gen), want)


def test_multilingual_logits_out_are_the_models_without_guidance_too(
    multilingual: ChatterboxMultilingualTTS,
) -> None:
    # Without guidance the analyzer got the very tensor logits_out keeps, and upstream's
    # analyzer writes -2**15 into its stop logit in place: every recorded step read -32768
    # there (before 2026-12-04), where with guidance the model's own logit was kept.
    stop = multilingual.t3.hp.stop_speech_token
    ids = text_tokens(multilingual, "Hello there.", cfg_weight=0.0, language_id="en")
    recorded: list[torch.Tensor] = []
    t3_decode(multilingual.t3, multilingual.conds.t3, ids, max_new_tokens=4, cfg_weight=0.0,
              logits_out=recorded)  # fmt: skip
    assert recorded and all(float(step[0, stop]) != -(2.0**15) for step in recorded), recorded
