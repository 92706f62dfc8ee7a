"""Capped generation through the upstream path, and reference-audio checks."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from chatterbox import tts as chatterbox_tts
from chatterbox.tts import ChatterboxTTS
from torch.overrides import TorchFunctionMode

from tts_workbench.core.errors import CacheError, ConfigError, EmptyTextError, NoVoiceError, SourceError
from tts_workbench.core.families import FAMILIES
from tts_workbench.core.patching import shadow
from tts_workbench.core.rng import StreamRandom
from tts_workbench.instruments.profiling import t3_phase
from tts_workbench.models.reference import check_reference, make_reference_wav
from tts_workbench.models.sources import load_model
from tts_workbench.runtime.decode import (
    DecodePlan,
    check_new_tokens,
    generated_ids,
    prefill_embeds,
    t3_decode,
    text_tokens,
)
from tts_workbench.runtime.generation import ended_by, generate, prepare_voice, timed, token_cap
from tts_workbench.runtime.optimized import PerformanceOptimizedTTS

if TYPE_CHECKING:
    from conftest import MeetingOn, Steer


def test_same_seed_same_tokens_and_audio(tiny_tts: ChatterboxTTS) -> None:
    a = generate(tiny_tts, "Hello there.", max_new_tokens=30, seed=7)
    b = generate(tiny_tts, "Hello there.", max_new_tokens=30, seed=7)
    c = generate(tiny_tts, "Hello there.", max_new_tokens=30, seed=8)
    assert a.speech_tokens == b.speech_tokens and np.array_equal(a.wav, b.wav)
    assert a.speech_tokens != c.speech_tokens


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": True}, "max_new_tokens must be an int, got True"),
        ({"max_new_tokens": torch.tensor([4])}, "max_new_tokens must be an int"),
        ({"seed": True}, "seed must be an int"),
    ],
)
def test_the_baseline_refuses_the_seeds_and_caps_the_wrappers_refuse(
    tiny_tts: ChatterboxTTS, kwargs: dict[str, object], message: str
) -> None:
    # Before, a cap of True (or a one-element tensor) spoke that many tokens and a seed of True
    # failed in torch's manual_seed: the wrappers and streams refused them, the baseline did not.
    with pytest.raises(ConfigError, match=message):
        generate(tiny_tts, "Hello.", **{"max_new_tokens": 4, **kwargs})  # type: ignore[arg-type]


def test_cap_not_stop_token_ends_random_weights(tiny_tts: ChatterboxTTS) -> None:
    r = generate(tiny_tts, max_new_tokens=40)
    assert len(r.speech_tokens) == 40 and r.stopped_by == "token cap"
    valid = 40 - r.invalid_tokens
    # S3Gen makes 2 mel frames per token, HiFT 480 samples per frame (24 kHz)
    assert len(r.wav) == valid * 2 * 480
    assert set(r.seconds) == {"t3", "t3.prefill", "t3.decode", "s3gen.flow", "s3gen.vocoder", "watermark"}
    assert r.decode_steps == 40  # one timed one-position forward per token (no clock compared)
    assert r.rtf > 0


def test_every_phase_is_timed_and_t3_decode_counts_one_forward_per_token(tiny_tts: ChatterboxTTS) -> None:
    # Which phases ran and how often, not what the clock read (no timing assertions).
    r = generate(tiny_tts, max_new_tokens=150)
    assert len(r.speech_tokens) == 150
    assert set(r.seconds) == {"t3", "t3.prefill", "t3.decode", "s3gen.flow", "s3gen.vocoder", "watermark"}
    # T3's decode: one forward per token (upstream runs one more after the last sample), timed
    # from the prefill's end: what T3 does before its prefill is in neither phase.
    assert r.decode_steps == 150


def test_phase_times_come_back_unrounded(tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock that ticks by pi * 1e-5 s: no phase is a whole number of 0.1 ms (before: each was
    rounded to 4 decimals, a GPU's few-ms prefill losing its resolution beside the wrapper's raw
    times in the bench)."""
    from tts_workbench.core import clock
    from tts_workbench.runtime import generation

    reads = iter(range(1, 10**9))

    def ticking(device: object = None, stream: bool = False) -> float:
        return next(reads) * math.pi * 1e-5

    monkeypatch.setattr(clock, "now", ticking)  # the phases' stopwatches
    monkeypatch.setattr(generation, "now", ticking)  # t3.decode's end and the wall time
    r = generate(tiny_tts, "Hello.", max_new_tokens=3)
    assert r.seconds and all(v != round(v, 4) for v in r.seconds.values()), r.seconds


def test_t3_decode_is_timed_from_the_end_of_the_prefill(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clock that moves one second per reading and 1000 s inside each of the prefill's calls
    (transformer and speech head): all of those are the prefill's, none is the decode's."""
    from tts_workbench.core import clock
    from tts_workbench.runtime import generation

    elapsed = [0.0]

    def reading(device: object = None, stream: bool = False) -> float:
        elapsed[0] += 1.0
        return elapsed[0]

    def slow_prefill(forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if t3_phase(args, kwargs) == "t3.prefill":
                elapsed[0] += 1000.0
            return forward(*args, **kwargs)

        return run

    monkeypatch.setattr(clock, "now", reading)  # the phases' stopwatches
    monkeypatch.setattr(generation, "now", reading)  # t3.decode's end and the wall time
    # shadowed before generate: its timers wrap these, so the 1000 s fall inside their readings
    with (
        shadow(tiny_tts.t3.tfmr, "forward", slow_prefill),
        shadow(tiny_tts.t3.speech_head, "forward", slow_prefill),
    ):
        s = generate(tiny_tts, "Hello.", max_new_tokens=5).seconds
    assert s["t3.prefill"] >= 2000 and s["t3.decode"] < 1000, s
    assert s["t3"] >= s["t3.prefill"] + s["t3.decode"], s  # one after the other, inside T3's time


def test_instance_is_restored_after_shadowing(tiny_tts: ChatterboxTTS) -> None:
    with token_cap(tiny_tts, 5), timed({"t3": (tiny_tts.t3, "inference")}):
        assert "inference" in vars(tiny_tts.t3)
    assert "inference" not in vars(tiny_tts.t3)


def test_timers_of_two_threads_count_their_own_calls_and_leave_nothing_behind() -> None:
    class Model:
        def step(self) -> int:
            return 1

    m = Model()
    first = ExitStack()
    a = first.enter_context(timed({"step": (m, "step")}))
    entered = threading.Event()
    b_times: list[int] = []

    def other() -> None:  # enters after the main thread's timer and leaves after it
        with timed({"step": (m, "step")}) as b:
            entered.set()
            m.step()
            assert done.wait(timeout=30)
            m.step()
            b_times.append(b.calls["step"])

    done = threading.Event()
    thread = threading.Thread(target=other)
    thread.start()
    assert entered.wait(timeout=30)
    m.step()
    first.close()  # the first in leaves first
    done.set()
    thread.join(timeout=30)
    assert a.calls == {"step": 1} and b_times == [2]  # each timer its own thread's calls
    assert "step" not in vars(m)  # neither timer left on the model


def test_empty_text(tiny_tts: ChatterboxTTS) -> None:
    with pytest.raises(EmptyTextError, match="text is empty"):
        generate(tiny_tts, "   ")


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        ({"temperature": 0.0}, "temperature must be above 0"),
        ({"temperature": -1.0}, "temperature must be above 0"),
        ({"cfg_weight": 0.0}, r"without guidance: give cfg_weight above 0, or .*\(optimize=True\)"),
    ],
)
def test_sampling_settings_are_checked_before_upstream_runs(
    tiny_tts: ChatterboxTTS, steer: type[Steer], setting: dict[str, float], refusal: str
) -> None:
    # Before, temperature 0 failed inside torch ("probability tensor contains inf/nan"), -1 sampled,
    # and cfg_weight 0 failed in T3.inference ("Sizes of tensors must match").
    heads = steer({})  # counts the speech head's calls
    with shadow(tiny_tts.t3.speech_head, "forward", heads):
        with pytest.raises(ConfigError, match=refusal):
            generate(tiny_tts, "Hello.", max_new_tokens=4, **setting)
    assert heads.calls == 0


def test_no_voice() -> None:
    from tts_workbench.models.sources import load_model

    with pytest.raises(NoVoiceError, match="prepare_voice"):
        generate(load_model("tiny"), "Hello.")


def test_a_text_longer_than_t3s_positions_is_refused_before_upstream_runs(tiny_tts: ChatterboxTTS) -> None:
    with pytest.raises(ValueError, match="beyond the 2048 T3 has positions for: split it"):
        generate(tiny_tts, "hello world " * 1500, max_new_tokens=4)


def test_bad_cap(tiny_tts: ChatterboxTTS) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        generate(tiny_tts, max_new_tokens=0)
    # past T3's learned speech positions (before: an IndexError after ~4100 decoded tokens)
    with pytest.raises(ValueError, match="beyond the 4096 speech positions T3 has"):
        t3_decode(tiny_tts.t3, tiny_tts.conds.t3, text_tokens(tiny_tts, "Hi."), max_new_tokens=4097)


def test_the_speech_position_limit_is_llamas_learned_positions_only() -> None:
    turbo = load_model("turbo-tiny")  # GPT-2 positions itself: no learned speech positions
    check_new_tokens(turbo.t3, 5000)
    with pytest.raises(ValueError, match="beyond the 4096 speech positions"):
        check_new_tokens(load_model("tiny").t3, 4097)
    check_new_tokens(load_model("tiny").t3, 4096)  # the last learned position is taken


def test_a_generation_vocodes_after_its_first_start_id_but_turbo_keeps_all(tiny_tts: ChatterboxTTS) -> None:
    """What a whole generation vocodes (``generated_ids``): for the standard model what follows
    the first start-of-speech id sampled (a second one does not cut again); Turbo's head has the
    start id too, but its upstream vocodes every speech token sampled."""
    start = tiny_tts.t3.hp.start_speech_token
    assert generated_ids([1, start, 2, start, 3], tiny_tts.t3) == [2, 3]
    turbo = load_model("turbo-tiny").t3
    assert generated_ids([1, turbo.hp.start_speech_token, 2], turbo) == [1, 2]


def test_a_request_past_gpt2s_positions_is_refused_before_it_decodes(
    tmp_path: Path, steer: type[Steer]
) -> None:
    """Turbo's GPT-2 embeds a learned position per input (8196): the eager step ran into an
    IndexError there, after the work before it; a cache set too long later is refused too."""
    turbo = load_model("turbo-tiny")
    prepare_voice(turbo, str(make_reference_wav(tmp_path / "r.wav", seconds=6.0)))  # Turbo: > 5 s
    limit, cond = turbo.t3.tfmr.config.n_positions, turbo.conds.t3
    with torch.inference_mode():
        around_text = prefill_embeds(turbo.t3, cond, torch.ones(1, 1, dtype=torch.long), 0.0).size(1) - 1
    ids = torch.full((1, limit - around_text - 20), 100, dtype=torch.long)  # a prefill 20 short of it
    heads = steer({})  # counts the speech head's calls
    with shadow(turbo.t3.speech_head, "forward", heads):
        with pytest.raises(CacheError, match=f"GPT-2 backbone has n_positions={limit}: lower max_new_tokens"):
            t3_decode(turbo.t3, cond, ids, max_new_tokens=40)
    assert heads.calls == 0  # refused before the prefill
    plan = DecodePlan.plain(turbo.t3, step="static")
    plan.max_cache_len = limit + 1
    with pytest.raises(ConfigError, match=f"max_cache_len {limit + 1} is past the {limit} positions"):
        t3_decode(turbo.t3, cond, ids[:, :5], max_new_tokens=4, plan=plan)
    with PerformanceOptimizedTTS(turbo, policy="float32", decode="static") as opt:
        with pytest.raises(ConfigError, match=f"max_cache_len {limit + 1} is past"):
            opt.set_max_cache_len(limit + 1)
        assert opt.max_cache_len <= limit


def test_sampling_arguments_reach_the_processors_as_they_want_them() -> None:
    """TopK takes an int, Temperature a float: a JSON or keyword 2 or 50.0 must not fail a stream."""
    cfg_weight, sampling = FAMILIES["turbo"].sampling_with(
        {"temperature": 2, "top_k": 50.0, "cfg_weight": 0.7}
    )
    assert cfg_weight == 0.0  # Turbo's generate has no guidance
    assert sampling["temperature"] == 2.0 and isinstance(sampling["temperature"], float)
    assert sampling["top_k"] == 50 and isinstance(sampling["top_k"], int)
    assert FAMILIES["standard"].sampling_with({})[0] == 0.5


def test_a_cap_above_upstreams_own_is_reported_as_upstreams(tiny_tts: ChatterboxTTS) -> None:
    """Upstream generate caps T3 at 1000 tokens itself: asked for more, a generation ended there
    says so (before: "stop token", untrue for random weights). T3's own call with a cap of 3
    stands in for generate's 1000."""
    torch.manual_seed(0)  # upstream's T3 draws from the global generator
    with token_cap(tiny_tts, 5000) as seen, torch.inference_mode():  # as upstream generate calls it
        tiny_tts.t3.inference(
            t3_cond=tiny_tts.conds.t3, text_tokens=text_tokens(tiny_tts, "Hi."), max_new_tokens=3
        )
    raw, stop = seen["tokens"][0].tolist(), tiny_tts.t3.hp.stop_speech_token
    assert (
        seen["cap"] == 3
        and ended_by(raw, stop, seen["cap"], 5000) == "upstream generate's own cap of 3 tokens"
    )
    assert ended_by([1, 2, 3], stop, 3, 3) == "token cap"
    assert ended_by([1, 2], stop, 3, 3) == ended_by([1, 2, stop], stop, 3, 3) == "stop token"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"this is not audio", "not a readable audio file"),
        ("empty", "is empty"),
        ("zeros", "all zeros"),
    ],
)
def test_bad_reference_audio(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "ref.wav"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "empty":
        sf.write(path, np.zeros(0, dtype=np.float32), 24000)
    elif content == "zeros":
        sf.write(path, np.zeros(24000, dtype=np.float32), 24000)
    with pytest.raises(SourceError, match=message):
        check_reference(path)


def test_stereo_and_other_rates_are_converted_and_reported(reference_wav: Path, tmp_path: Path) -> None:
    mono, sr = sf.read(reference_wav)
    path = tmp_path / "stereo44k.wav"
    idx = np.linspace(0, len(mono) - 1, int(len(mono) * 44100 / sr)).astype(int)
    sf.write(path, np.stack([mono[idx], 0.5 * mono[idx]], axis=1), 44100)
    info = check_reference(path)
    assert any("2 channels" in n for n in info.notes)
    assert any("44100 Hz" in n for n in info.notes)
    # Converted, not only reported: the voice is prepared from it and speaks. (A model of its own:
    # the session's shared one keeps its voice.)
    tts = load_model("tiny", seed=0)
    assert prepare_voice(tts, str(path)).notes == info.notes
    wav = generate(tts, "Hello.", max_new_tokens=4).wav
    assert wav.size > 0 and np.isfinite(wav).all()


def test_a_float_reference_far_past_full_scale_is_said(reference_wav: Path, tmp_path: Path) -> None:
    """A float WAV peaking at 20 (a recording never scaled) was "used as is", unsaid, before
    2026-12-07; a resampler's overshoot a little past 1.0 stays unremarked."""
    mono, sr = sf.read(reference_wav, dtype="float32")
    loud, over = tmp_path / "loud.wav", tmp_path / "over.wav"
    sf.write(loud, mono / np.abs(mono).max() * 20, sr, subtype="FLOAT")
    sf.write(over, mono / np.abs(mono).max() * 1.05, sr, subtype="FLOAT")
    assert check_reference(loud).notes == [
        "samples reach 20.0, past full scale (1.0): used as they are, as upstream does; scale the "
        "recording to full scale if it was not meant so"
    ]
    assert check_reference(over).notes == []


def test_a_reference_given_to_generate_is_checked_as_prepare_voice_checks_it(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    # Before, upstream generate prepared it itself, without the workbench's reference checks.
    zeros = tmp_path / "zeros.wav"
    sf.write(zeros, np.zeros(24000, dtype=np.float32), 24000)
    conds = tiny_tts.conds
    with pytest.raises(SourceError, match="all zeros"):
        generate(tiny_tts, "Hello.", max_new_tokens=4, audio_prompt_path=str(zeros))
    assert tiny_tts.conds is conds  # refused before anything was prepared


@pytest.mark.parametrize(
    ("call", "named"),
    [
        ({"temprature": 0.5}, "upstream's standard generate got an unexpected keyword argument 'temprature'"),
        # before 2026-12-07 upstream's TypeError, for "en" too (the engine and stream took it)
        ({"language_id": "fr"}, "the standard model speaks English only"),
        ({"language_id": 5}, "language_id must be a language code such as 'fr', or None"),  # AttributeError
        ({"language_id": " "}, "language_id must be a language code"),  # (Multilingual read a blank as en)
    ],
)
def test_an_argument_upstream_generate_does_not_take_is_refused_before_the_voice_is_prepared(
    tiny_tts: ChatterboxTTS, reference_wav: Path, call: dict[str, Any], named: str
) -> None:
    # Before, the reference was prepared into tts.conds, and only then upstream generate raised a
    # TypeError: the caller's voice was replaced by a call that failed. (The fixture's own
    # reference: were it prepared, the session's voice would stay the same.)
    conds = tiny_tts.conds
    with pytest.raises(ConfigError, match=named):
        generate(tiny_tts, "Hello.", max_new_tokens=4, audio_prompt_path=str(reference_wav), **call)
    assert tiny_tts.conds is conds


def test_a_language_id_of_none_or_english_is_what_an_english_model_speaks(tiny_tts: ChatterboxTTS) -> None:
    """A caller that passes its optional language on (diagnose's ``language_id``, None for the
    English-only families) needs no branch of its own, and English, asked of an English-only
    model, is what it speaks (as the engine and the stream take it); another is refused above."""
    alone = generate(tiny_tts, "Hello.", max_new_tokens=4, seed=0).speech_tokens
    for language in (None, "en", "EN"):
        given = generate(tiny_tts, "Hello.", max_new_tokens=4, seed=0, language_id=language)
        assert given.speech_tokens == alone, language


@pytest.mark.parametrize(("samples", "accepted"), [(120010, True), (120000, False)])
def test_turbos_five_seconds_are_measured_as_upstream_measures_them(
    tmp_path: Path, samples: int, accepted: bool
) -> None:
    # Before, the check read ReferenceInfo.seconds, rounded to 3 decimals: 5.0004 s (120010
    # samples at 24 kHz), which upstream's `len(wav) / sr > 5.0` accepts, was refused as 5.0 s.
    data, sr = sf.read(make_reference_wav(tmp_path / "r10.wav", seconds=10.0), dtype="float32")
    path = tmp_path / "r5.wav"
    sf.write(path, data[:samples], sr)
    turbo = load_model("turbo-tiny")
    conds = turbo.conds
    if accepted:
        prepare_voice(turbo, str(path))
        assert turbo.conds is not conds
    else:
        with pytest.raises(
            SourceError, match=r"longer than 5 s; .* has 5\.00000 s \(120000 samples at 24000 Hz"
        ):
            prepare_voice(turbo, str(path))


def test_seeded_generations_in_two_threads_speak_their_solo_tokens_and_leave_the_global_generator(
    tiny_tts: ChatterboxTTS,
) -> None:
    # Before, a seed was torch.manual_seed: two threads' generations drew from one global
    # generator, each took the other's numbers, and the caller's random state was replaced.
    text = "Hello there friend."
    solo = {seed: generate(tiny_tts, text, max_new_tokens=30, seed=seed) for seed in (1, 2)}
    assert solo[1].speech_tokens != solo[2].speech_tokens
    # What upstream generate gives after torch.manual_seed, bit for bit (the notebooks' numbers).
    with token_cap(tiny_tts, 30) as seen:
        torch.manual_seed(1)
        wav = tiny_tts.generate(text)
    assert seen["tokens"][0].tolist() == solo[1].speech_tokens and np.array_equal(wav[0].numpy(), solo[1].wav)
    torch.manual_seed(2)  # no seed: the caller's random state, as upstream
    unseeded = generate(tiny_tts, text, max_new_tokens=30, seed=None)
    assert unseeded.speech_tokens == solo[2].speech_tokens and np.array_equal(unseeded.wav, solo[2].wav)

    together: dict[int, Any] = {}
    start = threading.Barrier(2)

    def run(seed: int) -> None:
        start.wait()
        together[seed] = generate(tiny_tts, text, max_new_tokens=30, seed=seed)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    threads = [threading.Thread(target=run, args=(seed,)) for seed in solo]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for seed, alone in solo.items():
        assert together[seed].speech_tokens == alone.speech_tokens
        assert np.array_equal(together[seed].wav, alone.wav)
    assert torch.equal(torch.get_rng_state(), before)  # neither read nor changed


_DRAWS: dict[str, Callable[[torch.Generator | None], torch.Tensor]] = {
    "normal(mean, std)": lambda g: torch.normal(torch.zeros(4), 1.0, generator=g),
    "normal(mean, std, size)": lambda g: torch.normal(0.0, 1.0, (4,), generator=g),
    "Tensor.cauchy_": lambda g: torch.empty(4).cauchy_(generator=g),
    "Tensor.log_normal_": lambda g: torch.empty(4).log_normal_(generator=g),
    "Tensor.geometric_": lambda g: torch.empty(4).geometric_(0.5, generator=g),
    "Tensor.multinomial": lambda g: torch.ones(4).multinomial(2, generator=g),
    "Tensor.bernoulli": lambda g: torch.full((4,), 0.5).bernoulli(generator=g),
}


@pytest.mark.parametrize("name", list(_DRAWS))
def test_a_streams_drawing_hands_its_generator_to_these_draws_too(name: str) -> None:
    # Before, these drew from the global generator inside StreamRandom.drawing().
    draw = _DRAWS[name]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with StreamRandom(5).drawing():
        got = draw(None)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(got, draw(torch.Generator().manual_seed(5)))


class _CountLinear(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.calls += func is F.linear
        return func(*args, **(kwargs or {}))


def test_a_seeded_generate_leaves_the_callers_own_torch_function_modes_on(tiny_tts: ChatterboxTTS) -> None:
    # Before, the seeded generate switched every torch function mode off inside T3's backbone
    # and the flow (DisableTorchFunction), a caller's own too: this one saw 20 of 371 linears.
    counted = []
    for seed in (None, 0):
        torch.manual_seed(0)  # seed None goes on from here: the same draws as seed 0
        with _CountLinear() as mode:
            result = generate(tiny_tts, "Hello.", max_new_tokens=5, seed=seed)
        counted.append((mode.calls, result.speech_tokens))
    assert counted[0] == counted[1] and counted[0][0] > 100


@pytest.mark.parametrize("voices", ["audio_prompt_path", "exaggeration"])
def test_two_threads_giving_one_model_their_own_voices_each_speak_theirs(
    voices: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meeting: MeetingOn
) -> None:
    # Before, only multilingual calls took turns: a standard (or Turbo) call's reference, prepared
    # into tts.conds, or standard upstream generate's conds.t3 rebuilt for its exaggeration, was
    # there for the other call's upstream generate to read: thread 0 spoke thread 1's voice.
    tts = load_model("tiny")
    if voices == "audio_prompt_path":
        calls = [
            {voices: str(make_reference_wav(tmp_path / f"r{i}.wav", seconds=3.0, seed=i))} for i in (1, 2)
        ]
    else:
        prepare_voice(tts, str(make_reference_wav(tmp_path / "r.wav", seconds=3.0)))
        calls = [{voices: value} for value in (0.2, 0.9)]
    # The tiny T3's tokens do not change with the exaggeration: the one its T3 was given tells.
    heard: dict[str, float] = {}  # by thread

    def hearing(inference: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def heard_with(**kwargs: Any) -> torch.Tensor:
            heard[threading.current_thread().name] = float(kwargs["t3_cond"].emotion_adv.flatten()[0])
            return inference(**kwargs)

        return heard_with

    def speak(call: dict[str, Any]) -> tuple[np.ndarray, float]:
        wav = generate(tts, "Hello there.", max_new_tokens=8, seed=0, **call).wav
        return wav, heard[threading.current_thread().name]

    with shadow(tts.t3, "inference", hearing):
        solo = [speak(call) for call in calls]
        assert not np.array_equal(solo[0][0], solo[1][0]) or solo[0][1] != solo[1][1]

        # Upstream generate reads tts.conds after punc_norm: there both calls' voices are written
        # before either is read (``Meeting``: a call waiting for its turn lets the call in turn go on).
        met = meeting(tts)
        punc_norm = chatterbox_tts.punc_norm

        def norm_once_both_are_here(text: str) -> str:
            met.wait()
            return punc_norm(text)

        monkeypatch.setattr(chatterbox_tts, "punc_norm", norm_once_both_are_here)
        together: dict[int, tuple[np.ndarray, float]] = {}

        def run(i: int) -> None:
            together[i] = speak(calls[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert sorted(together) == [0, 1]
    for i, (wav, exaggeration) in enumerate(solo):
        assert np.array_equal(together[i][0], wav) and together[i][1] == exaggeration, f"thread {i}"


@pytest.mark.parametrize("writer", ["generate", "prepare_voice"])
def test_a_generate_that_writes_no_voice_takes_its_turn_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meeting: MeetingOn, writer: str
) -> None:
    """Upstream generate reads the voice twice (T3, then S3Gen). Before 2026-12-05 a call that
    wrote none took no turn, and before 2026-12-06 prepare_voice wrote one without taking it: a
    call writing another voice between the two reads gave its S3Gen that voice. Here A (the
    prepared voice) waits after T3 for B's voice (B's generate's, or prepare_voice's) to be written."""
    refs = [str(make_reference_wav(tmp_path / f"v{i}.wav", seconds=3.0, seed=i)) for i in (1, 2)]
    tts = load_model("tiny")

    def speak(**call: Any) -> np.ndarray:
        return generate(tts, "Hello there.", max_new_tokens=8, seed=0, **call).wav

    prepare_voice(tts, refs[1])
    other = speak()
    prepare_voice(tts, refs[0])
    solo = speak()
    assert not np.array_equal(solo, other)
    a_decoded, met = threading.Event(), meeting(tts)
    drop, prepare = chatterbox_tts.drop_invalid_tokens, tts.prepare_conditionals

    def dropped_then_met(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "A":  # T3 done, S3Gen's voice not yet read
            a_decoded.set()
            met.wait()
        return drop(*args, **kwargs)

    def prepared_then_met(*args: Any, **kwargs: Any) -> None:
        prepare(*args, **kwargs)
        met.wait()

    monkeypatch.setattr(chatterbox_tts, "drop_invalid_tokens", dropped_then_met)
    monkeypatch.setattr(tts, "prepare_conditionals", prepared_then_met)
    got: dict[str, np.ndarray] = {}

    def a() -> None:
        got["A"] = speak()

    def b() -> None:
        assert a_decoded.wait(60)
        if writer == "generate":
            got["B"] = speak(audio_prompt_path=refs[1])
        else:
            prepare_voice(tts, refs[1])
            got["B"] = np.zeros(0)  # done

    threads = [threading.Thread(target=f, name=f.__name__.upper()) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(got) == ["A", "B"]
    assert np.array_equal(got["A"], solo)


def test_a_prepared_voice_holds_no_autograd_graph(reference_wav: Path) -> None:
    # Upstream embeds the x-vector with autograd on: the voice kept CAMPPlus's saved activations
    # alive through the embedding's grad_fn (181 MB per voice), and copy.deepcopy refused it.
    tts = load_model("tiny", seed=0)
    prepare_voice(tts, str(reference_wav))
    tensors = [*vars(tts.conds.t3).values(), *tts.conds.gen.values()]
    held = [t for t in tensors if torch.is_tensor(t) and (t.requires_grad or t.grad_fn is not None)]
    assert not held and torch.is_grad_enabled()
