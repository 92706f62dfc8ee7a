"""PerformanceOptimizedTTS on the tiny model: equivalence with upstream, dtype policies, reports."""

from __future__ import annotations

import copy
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from chatterbox.tts import ChatterboxTTS, Conditionals
from safetensors.torch import load_file, save_file

from conftest import MeetingOn, pretend_cuda, voiced
from tts_workbench.core import patching
from tts_workbench.core.clock import FEW_REPEATS
from tts_workbench.core.constants import SAMPLES_PER_TOKEN
from tts_workbench.core.errors import CacheError, ConfigError, EmptyTextError, SourceError
from tts_workbench.core.families import components
from tts_workbench.core.patching import shadow
from tts_workbench.core.positions import positions_needed
from tts_workbench.instruments.attention import record_kernels
from tts_workbench.models.checkpoints import load_folder, save_checkpoint
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.models.sources import load_model
from tts_workbench.models.vocode import s3gen_inference
from tts_workbench.runtime import decode as decode_module
from tts_workbench.runtime import generation, optimized, streaming
from tts_workbench.runtime.decode import DecodePlan, DecodeStats, T3Parts, decode_blocks, t3_decode
from tts_workbench.runtime.generation import generate
from tts_workbench.runtime.optimized import (
    PerformanceOptimizedTTS,
    Pipeline,
    Policy,
    UpstreamTTS,
    choose_policy,
)
from tts_workbench.runtime.precision import copy_conditionals, island_modules
from tts_workbench.runtime.streaming import StreamConfig, StreamReport, StreamState
from tts_workbench.studies.diagnose import parameter_frame, policy_frame

if TYPE_CHECKING:
    from conftest import Steer

TEXT = "Hello there, this is a test."


@pytest.fixture(scope="module")
def short_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 s voice: S3Gen prepends the whole prompt to every call, so short keeps these tests fast."""
    return make_reference_wav(tmp_path_factory.mktemp("ref2") / "ref.wav", seconds=2.0)


@pytest.fixture(scope="module")
def folders(short_ref: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model with a prepared voice (so conds.pt is written), saved in three dtypes."""
    tts = load_model("tiny")
    tts.prepare_conditionals(str(short_ref))
    root = tmp_path_factory.mktemp("ckpt")
    return {d: save_checkpoint(tts, root / d, getattr(torch, d)) for d in ("float32", "float16", "bfloat16")}


def _text(tts: ChatterboxTTS) -> torch.Tensor:
    t = tts.tokenizer.text_to_tokens(TEXT)
    t = torch.cat([t, t])
    return F.pad(F.pad(t, (1, 0), value=tts.t3.hp.start_text_token), (0, 1), value=tts.t3.hp.stop_text_token)


SAMPLINGS = [{}, {"top_p": 1.0, "temperature": 0.9, "repetition_penalty": 1.5, "min_p": 0.1}]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_decode_loop_samples_the_same_tokens_as_upstream(tiny_tts: ChatterboxTTS, sampling: dict) -> None:
    cond, text = tiny_tts.conds.t3, _text(tiny_tts)
    torch.manual_seed(7)
    upstream = tiny_tts.t3.inference(t3_cond=cond, text_tokens=text, max_new_tokens=40, **sampling)
    torch.manual_seed(7)
    ours = t3_decode(tiny_tts.t3, cond, text, max_new_tokens=40, **sampling)
    assert ours.tokens.shape == (1, 40)
    assert torch.equal(upstream, ours.tokens)


def stop_pushed(tts: ChatterboxTTS, by: float) -> AbstractContextManager[None]:
    """Random weights almost never stop: while inside, the stop logit is ``by`` higher."""
    stop = tts.t3.hp.stop_speech_token

    def wrap(forward):  # type: ignore[no-untyped-def]
        def biased(x: torch.Tensor) -> torch.Tensor:
            out = forward(x)
            out[..., stop] += by
            return out

        return biased

    return shadow(tts.t3.speech_head, "forward", wrap)


@pytest.fixture
def likely_stop(tiny_tts: ChatterboxTTS) -> Iterator[None]:
    """A stop within a few steps."""
    with stop_pushed(tiny_tts, 4.0):
        yield


@pytest.mark.parametrize(("every", "step"), [(1, "eager"), (8, "eager"), (64, "eager"), (8, "static")])
def test_stop_token_ends_the_stream_like_upstream(
    tiny_tts: ChatterboxTTS, likely_stop: None, every: int, step: str
) -> None:
    cond, text = tiny_tts.conds.t3, _text(tiny_tts)
    torch.manual_seed(1)
    upstream = tiny_tts.t3.inference(t3_cond=cond, text_tokens=text, max_new_tokens=60)
    after_upstream = torch.get_rng_state()
    torch.manual_seed(1)
    plan = DecodePlan.plain(tiny_tts.t3, step=step)
    ours = t3_decode(tiny_tts.t3, cond, text, max_new_tokens=60, stop_check_every=every, plan=plan)
    assert upstream[0, -1] == tiny_tts.t3.hp.stop_speech_token and upstream.size(1) < 60
    assert ours.stopped and torch.equal(upstream, ours.tokens)
    assert ours.steps == ours.tokens.size(1)  # the stats count exactly the tokens returned
    # Draws after the stop (sampled before the block's check saw it) are taken back: what
    # draws next (S3Gen's noise in generate) starts where it starts after upstream's T3.
    assert torch.equal(torch.get_rng_state(), after_upstream)


def test_a_seeded_generate_stopping_mid_block_speaks_upstreams_audio(
    tiny_tts: ChatterboxTTS, steer: type[Steer]
) -> None:
    stop = tiny_tts.t3.hp.stop_speech_token

    def stop_at(call: int):  # type: ignore[no-untyped-def]
        # the 5th token: not at a stop check (every 8), long enough for S3Gen's convolutions
        return shadow(tiny_tts.t3.speech_head, "forward", steer({call: stop}))

    upstream = UpstreamTTS(tiny_tts)
    with stop_at(6):
        want = upstream.generate(TEXT, max_new_tokens=40, seed=0)
    for step in ("eager", "static"):
        with PerformanceOptimizedTTS(tiny_tts, policy="float32", decode=step) as opt, stop_at(6):
            got = opt.generate(TEXT, max_new_tokens=40, seed=0)
        assert opt.last.stopped_by == upstream.last.stopped_by == "stop token"
        assert torch.equal(got, want), step


def test_both_pipelines_count_the_same_invalid_tokens_after_a_stop(tiny_tts: ChatterboxTTS) -> None:
    # The stop token ends the tokens; it is not an id S3Gen failed to vocode. (A milder push
    # than likely_stop's: a stop after ~27 tokens, enough for S3Gen's convolutions.)
    with stop_pushed(tiny_tts, 2.0):
        upstream = UpstreamTTS(tiny_tts)
        want = upstream.generate(TEXT, max_new_tokens=60, seed=3)
        with PerformanceOptimizedTTS(tiny_tts, policy="float32", decode="eager") as opt:
            got = opt.generate(TEXT, max_new_tokens=60, seed=3)
    assert upstream.last.stopped_by == opt.last.stopped_by == "stop token"
    assert upstream.last.tokens == opt.last.tokens
    assert upstream.last.invalid_tokens == opt.last.invalid_tokens
    # Both share the count, so equal counts cannot see the stop counted as invalid: S3Gen vocodes
    # every token but the stop and the invalid ones, SAMPLES_PER_TOKEN samples each.
    for pipeline, wav in ((upstream, want), (opt, got)):
        vocoded = pipeline.last.tokens - 1 - pipeline.last.invalid_tokens
        assert pipeline.last.invalid_tokens > 0 and wav.shape[1] == vocoded * SAMPLES_PER_TOKEN


def test_a_stats_object_passed_again_starts_afresh(tiny_tts: ChatterboxTTS) -> None:
    cond, text = tiny_tts.conds.t3, _text(tiny_tts)
    stats = DecodeStats()
    stop = tiny_tts.t3.hp.stop_speech_token

    def push(forward):  # type: ignore[no-untyped-def]
        return lambda x: forward(x).index_fill_(-1, torch.tensor([stop]), 1e4)  # the stop, at once

    with shadow(tiny_tts.t3.speech_head, "forward", push):
        first = torch.cat(list(decode_blocks(tiny_tts.t3, cond, text, max_new_tokens=60, stats=stats)), dim=1)
    assert stats.stopped and first.size(1) == 1
    fresh = DecodeStats()
    torch.manual_seed(2)
    want = torch.cat(list(decode_blocks(tiny_tts.t3, cond, text, max_new_tokens=30, stats=fresh)), dim=1)
    torch.manual_seed(2)
    again = torch.cat(list(decode_blocks(tiny_tts.t3, cond, text, max_new_tokens=30, stats=stats)), dim=1)
    assert want.size(1) == 30 and torch.equal(again, want)
    assert (stats.steps, stats.stopped, stats.sampled) == (fresh.steps, fresh.stopped, fresh.sampled)


def test_temperature_zero_is_refused_with_its_own_error(tiny_tts: ChatterboxTTS) -> None:
    # (it divides the logits: before, the NaNs it made were blamed on half precision)
    with pytest.raises(ConfigError, match="temperature must be above 0"):
        t3_decode(tiny_tts.t3, tiny_tts.conds.t3, _text(tiny_tts), max_new_tokens=4, temperature=0.0)


def test_choosing_the_policy_leaves_the_global_random_state_alone(tiny_tts: ChatterboxTTS) -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    choose_policy(tiny_tts)
    assert torch.equal(torch.get_rng_state(), before)
    # nor does building the wrapper (its Flash probe made random inputs)
    with PerformanceOptimizedTTS(tiny_tts, policy="float32"):
        assert torch.equal(torch.get_rng_state(), before)


def test_policy_timings_are_medians_and_spreads_of_each_policy(tiny_tts: ChatterboxTTS) -> None:
    frame = policy_frame(tiny_tts, ["float32", "decode-bfloat16"])
    # Before, 3 repeats: their "IQR" was part of their range, not a quartile spread.
    assert list(frame["policy"]) == ["float32", "decode-bfloat16"] and set(frame["repeats"]) == {FEW_REPEATS}
    assert FEW_REPEATS >= 4  # fewer repeats have no quartiles of their own
    assert (frame[["prefill_ms", "step_ms"]] > 0).all().all()
    assert (frame[["prefill_iqr_ms", "step_iqr_ms"]] >= 0).all().all()
    assert next(tiny_tts.t3.parameters()).dtype == torch.float32  # measured on copies


def test_parameter_table_is_each_wrappers_bytes_in_mib(folders: dict[str, Path]) -> None:
    load = PerformanceOptimizedTTS.from_local
    models = {d: load(f, dtype="keep", record_attention=False) for d, f in folders.items()}
    try:
        frame = parameter_frame(models).set_index("model")
        held = models["float16"].performance_info()["memory"]["parameter_bytes"]
        assert frame.loc["float16", "t3_mib"] == held["t3"] / 2**20
        assert frame.loc["float16", "t3_mib"] == pytest.approx(frame.loc["float32", "t3_mib"] / 2)
    finally:
        for m in models.values():
            m.close()


def test_a_model_has_one_open_wrapper_at_a_time(tiny_tts: ChatterboxTTS) -> None:
    # Before, two wrappers closed out of order left the model in the first one's bfloat16, with
    # its copy of the conditionals: each restores what it saw when it opened.
    conds = tiny_tts.conds
    with PerformanceOptimizedTTS(tiny_tts, policy="bfloat16"):
        with pytest.raises(
            ConfigError, match="already wrapped by an open PerformanceOptimizedTTS: close it"
        ) as e:
            PerformanceOptimizedTTS(tiny_tts, policy="bfloat16")
    # Before 2026-12-05 it said "or wrap a copy of the model": a deep copy of a model fails (HiFT's
    # weight norm keeps non-leaf tensors), and one made while wrapped has the wrapper's weights.
    assert "copy" not in str(e.value) and "load the model again (load_model" in str(e.value)
    assert next(tiny_tts.t3.parameters()).dtype == torch.float32 and tiny_tts.conds is conds
    with PerformanceOptimizedTTS(tiny_tts, policy="float32"):  # closed: the model may be wrapped again
        pass


def test_two_wrappers_built_at_once_on_one_model_refuse_the_second(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before 2026-12-05 a wrapper took the model only at the end of its constructor: a second one
    built meanwhile (while "auto" measured) passed the check too, and once both closed the model
    stayed bfloat16. The first is held in its measurement while the second is built."""
    import threading

    measuring, released = threading.Event(), threading.Event()
    measure = optimized.measure_policy

    def held(*args: Any, **kwargs: Any) -> Any:
        measuring.set()
        released.wait(60)
        return measure(*args, **kwargs)

    monkeypatch.setattr(optimized, "measure_policy", held)
    built: list[PerformanceOptimizedTTS] = []
    first = threading.Thread(target=lambda: built.append(PerformanceOptimizedTTS(tiny_tts, policy="auto")))
    first.start()
    try:
        assert measuring.wait(60)
        with pytest.raises(ConfigError, match="already wrapped by an open PerformanceOptimizedTTS"):
            built.append(PerformanceOptimizedTTS(tiny_tts, policy="bfloat16"))
    finally:
        released.set()
        first.join(120)
        for opt in built:
            opt.close()
    assert not first.is_alive() and len(built) == 1 and built[0].policy_choice.measured
    assert {p.dtype for m in (tiny_tts.t3, tiny_tts.s3gen) for p in m.parameters()} == {torch.float32}


def test_a_failed_build_leaves_the_model_free_to_wrap(tiny_tts: ChatterboxTTS) -> None:
    # The model is taken first thing in the constructor: a refused option must give it back.
    with pytest.raises(ConfigError, match="unknown decode step"):
        PerformanceOptimizedTTS(tiny_tts, policy="float32", decode="fast")
    with PerformanceOptimizedTTS(tiny_tts, policy="float32"):
        pass


def test_a_stop_check_every_below_one_is_refused_when_the_wrapper_is_built(tiny_tts: ChatterboxTTS) -> None:
    # before 2026-12-06 the wrapper was built and every generation it ran then failed
    with pytest.raises(ConfigError, match="stop_check_every must be a whole number .* got 0"):
        PerformanceOptimizedTTS(tiny_tts, policy="float32", stop_check_every=0)
    with PerformanceOptimizedTTS(tiny_tts, policy="float32"):  # the model was given back
        pass


def test_saving_a_model_an_open_wrapper_holds_is_refused(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    ref = {k: v.clone() for k, v in tiny_tts.t3.state_dict().items()}
    with PerformanceOptimizedTTS(tiny_tts, policy="bfloat16") as opt:
        # before: the wrapper's bfloat16-rounded weights, written to the file as float32
        with pytest.raises(ConfigError, match="held by an open PerformanceOptimizedTTS.*close"):
            save_checkpoint(tiny_tts, tmp_path / "ckpt")
        with pytest.raises(ConfigError, match=r"pass its \.tts.*close"):  # before: not a Chatterbox model
            save_checkpoint(opt, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    back = load_folder(save_checkpoint(tiny_tts, tmp_path / "ckpt"))  # closed: the model as it was
    assert all(torch.equal(ref[k], v) for k, v in back.t3.state_dict().items())


def test_a_voice_set_on_the_wrapped_model_is_the_callers_unchanged_after(tiny_tts: ChatterboxTTS) -> None:
    """Before 2026-12-07 the wrapper cast the voice a caller set on the wrapped model in place (its
    T3Cond, its S3Gen dict), and a new exaggeration was written into the caller's T3Cond: the voice
    stayed bfloat16 after close(), failing on the float32 model."""
    voice = copy_conditionals(tiny_tts.conds)
    assert voice is not None
    t3, gen, fields = voice.t3, voice.gen, dict(vars(voice.t3))
    tensors = dict(gen)
    with PerformanceOptimizedTTS(tiny_tts, policy="bfloat16") as opt:
        tiny_tts.conds = voice
        opt.generate(TEXT, max_new_tokens=4, seed=0, exaggeration=0.7)
        assert tiny_tts.conds is not voice and tiny_tts.conds.t3.speaker_emb.dtype == torch.bfloat16
    assert voice.t3 is t3 and voice.gen is gen and dict(gen) == tensors
    assert all(vars(t3)[k] is v for k, v in fields.items())  # the same tensors: float32, emotion 0.5


def test_a_close_that_fails_putting_a_weight_back_tries_again_at_the_next(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An allocation failing (or an interrupt) while the weights were copied back left the model
    cast, and the next close() found nothing left to undo and said it was given back."""
    restore = patching.ModuleSnapshot.restore
    calls: list[bool] = []

    def failing_once(snap: patching.ModuleSnapshot) -> None:
        calls.append(snap.module is tiny_tts.t3)
        if calls == [False, True]:  # T3's, the first time (VE's comes before it)
            raise KeyboardInterrupt
        restore(snap)

    opt = PerformanceOptimizedTTS(tiny_tts, policy="bfloat16")
    monkeypatch.setattr(patching.ModuleSnapshot, "restore", failing_once)
    with pytest.raises(KeyboardInterrupt):
        opt.close()
    assert not opt.closed and calls == [False, True, False]  # every component tried (ve, t3, s3gen)
    assert {p.dtype for p in tiny_tts.t3.parameters()} == {torch.bfloat16}  # the one that failed
    assert {p.dtype for p in tiny_tts.s3gen.parameters()} == {torch.float32}
    assert opt.configuration()["policy"] == "bfloat16"  # it still reports (its plans are gone: a KeyError)
    opt.close()
    assert opt.closed and not opt._snapshots  # the originals a cast replaced, let go
    assert {p.dtype for m in components(tiny_tts).values() for p in m.parameters()} == {torch.float32}


def test_a_model_object_sharing_a_wrapped_models_components_is_refused(
    tiny_tts: ChatterboxTTS, tmp_path: Path
) -> None:
    """Before 2026-12-06 a wrapper took its model object only: one on ``copy.copy(tts)`` (the same
    T3, S3Gen and VE) opened beside it, ran on its bfloat16 weights as float32, and once both were
    closed (the copy's last) the model stayed bfloat16 for good. A model built around the wrapped
    one's S3Gen alone is refused too, and neither is saved (its weights are the wrapper's)."""
    beside = copy.copy(tiny_tts)
    beside.t3 = copy.deepcopy(tiny_tts.t3)  # before the wrapper casts it: a T3 of its own
    with PerformanceOptimizedTTS(tiny_tts, policy="bfloat16"):
        for other in (copy.copy(tiny_tts), beside):
            with pytest.raises(ConfigError, match="already wrapped by an open PerformanceOptimizedTTS"):
                PerformanceOptimizedTTS(other, policy="float32")
            with pytest.raises(ConfigError, match="held by an open PerformanceOptimizedTTS"):
                save_checkpoint(other, tmp_path / "ckpt")
    assert {p.dtype for m in (tiny_tts.t3, tiny_tts.s3gen) for p in m.parameters()} == {torch.float32}
    with PerformanceOptimizedTTS(copy.copy(tiny_tts), policy="float32"):  # given back: free again
        pass


@pytest.mark.parametrize("inner", ["upstream", "wrapper"])
def test_a_pipeline_given_for_its_model_is_refused_with_the_fix(tiny_tts: ChatterboxTTS, inner: str) -> None:
    """Before 2026-12-06 a wrapper of a pipeline (``from_model(opt)``) failed with an AttributeError
    on ``.conds``; ``save_checkpoint`` already said to pass its ``.tts``. Refused before the model is
    taken: once the pipeline is done with it, the model wraps."""
    upstream = inner == "upstream"
    pipeline = UpstreamTTS(tiny_tts) if upstream else PerformanceOptimizedTTS(tiny_tts, policy="float32")
    with pipeline:
        with pytest.raises(ConfigError, match=r"pass its \.tts"):
            PerformanceOptimizedTTS(pipeline, policy="float32")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=r"pass its \.tts"):
            PerformanceOptimizedTTS.from_model(pipeline)  # type: ignore[arg-type]
    with PerformanceOptimizedTTS(tiny_tts, policy="float32"):
        pass


@pytest.mark.parametrize(
    "option", [{"plan": "static"}, {"amp": torch.bfloat16}, {"flow": "eager"}, {"decode": "eager"}]
)
def test_the_baselines_stream_refuses_the_wrappers_options(
    tiny_tts: ChatterboxTTS, short_ref: Path, option: dict[str, Any]
) -> None:
    """Before 2026-12-06 ``UpstreamTTS.generate_stream`` passed them on to ``streaming.stream``:
    ``flow="eager"`` and ``plan="static"`` failed with an AttributeError at the first window, after
    T3 ran; ``amp`` ran the baseline under autocast. Refused as ``from_model(optimize=False)``
    refuses them, before the voice is prepared or anything generated."""
    conds = tiny_tts.conds
    ran: list[object] = []
    hook = tiny_tts.t3.cond_enc.register_forward_pre_hook(lambda *_a: ran.append(_a))
    try:
        with pytest.raises(ConfigError, match=f"takes no {next(iter(option))}: leave"):
            UpstreamTTS(tiny_tts).generate_stream(TEXT, str(short_ref), max_new_tokens=4, **option)
    finally:
        hook.remove()
    assert tiny_tts.conds is conds and not ran


def test_a_closed_wrapper_still_says_how_it_ran(tiny_tts: ChatterboxTTS) -> None:
    with PerformanceOptimizedTTS(tiny_tts, policy="bfloat16", decode="static") as opt:
        opt.generate(TEXT, max_new_tokens=4, seed=0)
        during = opt.performance_info()
    after = opt.performance_info()  # before, a KeyError: the plans were let go
    assert after["model_dtype"] == during["model_dtype"] == "bfloat16"  # the wrapper's, not the model's now
    assert after["last_generation"] == during["last_generation"]
    with pytest.raises(ConfigError, match="was closed"):
        opt.vocode(torch.tensor([1, 2, 3]))
    # A report that fails at close() still lets the model go back, and the wrapper closes.
    opt = PerformanceOptimizedTTS(tiny_tts, policy="bfloat16")
    with mock.patch.object(opt, "configuration", side_effect=RuntimeError("report broke, on purpose")):
        with pytest.raises(RuntimeError, match="on purpose"):
            opt.close()
    assert opt.closed and next(tiny_tts.t3.parameters()).dtype == torch.float32
    PerformanceOptimizedTTS(tiny_tts, policy="float32").close()  # not held by the failed one


def test_a_closed_wrapper_refuses_to_run_or_change_the_model(
    tiny_tts: ChatterboxTTS, reference_wav: Path
) -> None:
    opt = PerformanceOptimizedTTS(tiny_tts, policy="float32")
    opt.close()
    conds = tiny_tts.conds
    for call in (
        lambda: opt.generate(TEXT, max_new_tokens=4),
        lambda: opt.prepare_conditionals(str(reference_wav)),
        lambda: opt.plan,  # before: KeyError 'eager', its plans being freed
        lambda: opt.plan_for("static"),
        lambda: opt.target_dtype,
        lambda: opt.set_max_cache_len(512),
    ):
        with pytest.raises(ConfigError, match="was closed .* wrap the model again"):
            call()
    assert tiny_tts.conds is conds  # the model given back is left alone


def test_a_stream_read_after_close_stops_there(tiny_tts: ChatterboxTTS, reference_wav: Path) -> None:
    with PerformanceOptimizedTTS(tiny_tts, policy="decode-bfloat16", decode="static") as opt:
        opt.prepare_conditionals(str(reference_wav))
        config = StreamConfig("buffered", first_window_s=0.2, window_s=0.2)
        unread = opt.generate_stream(TEXT, config=config, max_new_tokens=40)
        begun = opt.generate_stream(TEXT, config=config, max_new_tokens=40)
        next(begun)
    # the bfloat16 decode copy and the static cache are gone: neither stream may go on with them
    for chunks in (unread, begun):
        with pytest.raises(ConfigError, match="was closed"):
            next(chunks)
        assert next(chunks, None) is None  # and it is over
    assert next(tiny_tts.t3.parameters()).dtype == torch.float32


def test_a_hand_made_policy_is_checked_like_a_named_one(tiny_tts: ChatterboxTTS) -> None:
    with pytest.raises(ConfigError, match="fp16"):
        PerformanceOptimizedTTS(tiny_tts, policy=Policy("fp16", "typed by hand"))


def test_a_hand_made_auto_policy_is_refused_with_the_name_to_pass(tiny_tts: ChatterboxTTS) -> None:
    # Before, Policy("auto", ...) was taken as given and ran as "keep", nothing measured.
    with pytest.raises(ConfigError, match=r"""pass policy="auto" \(the name\)"""):
        PerformanceOptimizedTTS(tiny_tts, policy=Policy("auto", "typed by hand"))


@pytest.mark.parametrize(
    ("policy", "error"),
    [("bf16", r"unknown dtype policy 'bf16'; choose one of: "), ("auto", r"resolve it first.*choose_policy")],
)
def test_decode_plan_refuses_a_policy_it_would_run_as_the_models_own_weights(
    tiny_tts: ChatterboxTTS, policy: str, error: str
) -> None:
    # Before 2026-12-06 both decoded with the model's float32 weights, named as the policy given.
    with pytest.raises(ConfigError, match=error):
        optimized.decode_plan(tiny_tts, policy)
    assert optimized.decode_plan(tiny_tts, "bfloat16").decode.dtype == torch.bfloat16  # a known one runs


def test_optimize_false_refuses_the_wrappers_options(
    tiny_tts: ChatterboxTTS, folders: dict[str, Path]
) -> None:
    # Before, the upstream pipeline was built without them and ran upstream's dtype and decode loop.
    with pytest.raises(ConfigError, match="takes no dtype: leave"):
        PerformanceOptimizedTTS.from_model(tiny_tts, optimize=False, dtype="bfloat16")
    with pytest.raises(ConfigError, match="takes no decode, temprature: leave"):  # a misspelling too
        PerformanceOptimizedTTS.from_model(tiny_tts, optimize=False, decode="compiled", temprature=0.5)
    with pytest.raises(ConfigError, match="takes no decode"):
        PerformanceOptimizedTTS.from_local(folders["float32"], optimize=False, decode="static")
    with pytest.raises(ConfigError, match="takes no dtype"):  # refused before the (offline) hub is tried
        PerformanceOptimizedTTS.from_pretrained(optimize=False, dtype="float16")
    assert isinstance(PerformanceOptimizedTTS.from_model(tiny_tts, optimize=False, dtype="auto"), UpstreamTTS)


def _pipeline(tts: ChatterboxTTS, optimize: bool) -> Pipeline:
    """The baseline, or the wrapper in float32 with the eager step (nothing to measure or compile)."""
    return PerformanceOptimizedTTS(tts, policy="float32", decode="eager") if optimize else UpstreamTTS(tts)


def _fake_clock() -> tuple[Callable[..., float], Callable[[Callable[..., object]], Callable[..., object]]]:
    """A clock that stands still but while a voice is prepared, which moves it 100 s: a pipeline's
    total is 100 s when it counts the preparation, else 0 (no clock read compared with another)."""
    clock = [0.0]

    def slow(prepare: Callable[..., object]) -> Callable[..., object]:
        def prepared(*args: object, **kwargs: object) -> object:
            clock[0] += 100.0
            return prepare(*args, **kwargs)

        return prepared

    return lambda device=None: clock[0], slow


def test_both_pipelines_count_a_voice_prepared_for_the_call_in_the_total(
    tiny_tts: ChatterboxTTS, reference_wav: Path
) -> None:
    # Upstream generate prepares audio_prompt_path inside the call; the wrapper's clock started
    # after it, so the two totals timed different work.
    conds = tiny_tts.conds
    now, slow = _fake_clock()
    try:
        for module, optimize in ((generation, False), (optimized, True)):
            with (
                _pipeline(tiny_tts, optimize) as pipeline,
                mock.patch.object(module, "now", now),
                mock.patch.object(module, "prepare_voice", slow(module.prepare_voice)),
            ):
                pipeline.generate(TEXT, audio_prompt_path=str(reference_wav), max_new_tokens=4, seed=0)
                assert pipeline.last.seconds["total"] == 100.0, module.__name__
    finally:
        tiny_tts.conds = conds


@pytest.mark.parametrize("optimize", [False, True])
def test_empty_text_is_refused_before_a_voice_is_prepared(
    tiny_tts: ChatterboxTTS, tmp_path: Path, optimize: bool
) -> None:
    # Before, the wrapper prepared the reference first: a missing file said so, not the text;
    # both pipelines' streams too (until 2026-12-04), and the wrapper's sampling settings.
    missing = str(tmp_path / "missing.wav")
    with _pipeline(tiny_tts, optimize) as p:
        with pytest.raises(EmptyTextError, match="text is empty"):
            p.generate("  ", audio_prompt_path=missing, max_new_tokens=4)
        with pytest.raises(EmptyTextError, match="text is empty"):
            next(iter(p.generate_stream("  ", audio_prompt_path=missing, max_new_tokens=4)))
        with pytest.raises(ConfigError, match="temperature must be above 0"):
            p.generate("Hi.", audio_prompt_path=missing, max_new_tokens=4, temperature=0.0)


@pytest.mark.parametrize("optimize", [False, True])
def test_an_unseeded_stream_draws_its_seed_from_the_global_generator(
    tiny_tts: ChatterboxTTS, optimize: bool
) -> None:
    # Before, seed=None was a TypeError in both pipelines.
    config = StreamConfig("buffered", first_window_s=0.2, window_s=0.2)

    def tokens(p: Pipeline, global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)
        state = StreamState(StreamReport("buffered"))
        for _ in p.generate_stream(TEXT, config=config, max_new_tokens=8, seed=None, state=state):
            pass
        return state.tokens

    with _pipeline(tiny_tts, optimize) as p:
        assert tokens(p, 1) == tokens(p, 1) != tokens(p, 2)


@pytest.mark.parametrize("optimize", [False, True])
def test_a_stream_speaks_the_voice_asked_for_though_read_after_another_is_asked(
    tiny_tts: ChatterboxTTS, reference_wav: Path, tmp_path: Path, optimize: bool
) -> None:
    # Before, a stream read its voice (tts.conds) at its first chunk: one read after another
    # generate_stream with another voice (or another exaggeration) spoke that one.
    other = str(make_reference_wav(tmp_path / "other.wav", seconds=3.0, seed=2))
    config = StreamConfig("buffered", first_window_s=0.2, window_s=0.2)
    conds = tiny_tts.conds

    def asked(p: Pipeline, voice: str, exaggeration: float = 0.5) -> Iterator[tuple[np.ndarray, object]]:
        return p.generate_stream(TEXT, voice, config, exaggeration=exaggeration, max_new_tokens=12, seed=0)

    def audio(chunks: Iterator[tuple[np.ndarray, object]]) -> np.ndarray:
        return np.concatenate([c for c, _ in chunks])

    try:
        with _pipeline(tiny_tts, optimize) as p:
            alone = audio(asked(p, str(reference_wav)))
            first = asked(p, str(reference_wav))
            second = asked(p, other, exaggeration=0.9)
            assert np.array_equal(audio(first), alone)
            assert not np.array_equal(audio(second), alone)  # the other voice speaks otherwise
    finally:
        tiny_tts.conds = conds


def test_the_static_kv_cache_is_reported_apart_from_the_weights(tiny_tts: ChatterboxTTS) -> None:
    # Before, its bytes were a "t3.static_kv_cache" entry of parameter_bytes (and a column of
    # parameter_frame), read as weights.
    with PerformanceOptimizedTTS(tiny_tts, policy="float32", decode="static") as opt:
        opt.generate(TEXT, max_new_tokens=4, seed=0)
        memory = opt.performance_info()["memory"]
        assert memory["kv_cache_bytes"] == opt.plans["static"].static_bytes() > 0
        frame = parameter_frame({"static": opt})
    assert set(memory["parameter_bytes"]) == {"ve", "t3", "s3gen"}
    assert list(frame.columns) == ["model", "ve_mib", "t3_mib", "s3gen_mib"]
    assert UpstreamTTS(tiny_tts).performance_info()["memory"]["kv_cache_bytes"] == 0


def test_close_releases_the_static_kv_cache(tiny_tts: ChatterboxTTS) -> None:
    with PerformanceOptimizedTTS(tiny_tts, policy="float32", decode="static") as opt:
        opt.generate(TEXT, max_new_tokens=4, seed=0)
        plan = opt.plans["static"]
        assert plan.static_bytes() > 0
    # a plan kept past close (a bench's reference, say) holds no cache: close dropped it
    assert plan.static_bytes() == 0 and plan.static_step(2) is None


def test_the_timed_phases_of_a_generate_lie_within_its_total(tiny_tts: ChatterboxTTS) -> None:
    # Each phase is timed over its own work: one that also counted an earlier phase (S3Gen's
    # from the call's start, say) would add that phase twice and pass the total.
    with PerformanceOptimizedTTS(tiny_tts, policy="float32", decode="eager") as opt:
        opt.generate(TEXT, max_new_tokens=8, seed=0)
        seconds = opt.performance_info()["last_generation"]["seconds"]
    phases = [seconds[k] for k in ("t3.prefill", "t3.decode", "s3gen", "watermark")]
    assert all(s > 0 for s in phases), seconds
    assert sum(phases) <= seconds["total"], seconds


def test_upstreams_step_time_is_its_decode_over_the_forwards_it_ran(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a stop, upstream kept one token more than it ran decode forwards (the prefill
    # sampled the first): a step time over the tokens kept was too short.
    results = []

    def kept(*args: Any, **kwargs: Any) -> generation.GenerationResult:
        results.append(generation.generate(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(optimized, "capped_generate", kept)
    upstream = UpstreamTTS(tiny_tts)
    with stop_pushed(tiny_tts, 2.0):  # a stop after ~27 tokens (as the invalid-token test's)
        upstream.generate(TEXT, max_new_tokens=60, seed=3)
    (r,) = results
    assert r.stopped_by == "stop token" and r.decode_steps != len(r.speech_tokens)
    assert upstream.last.seconds["t3.step"] == pytest.approx(r.seconds["t3.decode"] / r.decode_steps)


def test_recording_the_kernels_runs_the_eager_step(tiny_tts: ChatterboxTTS) -> None:
    # a built step's graph hides its kernels from the recorder: recording takes the eager one
    with PerformanceOptimizedTTS(tiny_tts, policy="float32", decode="static", record_attention=True) as opt:
        opt.generate(TEXT, max_new_tokens=4, seed=0)
        assert opt.last.decode_step == "eager" and opt.plans["static"].static_bytes() == 0
        assert "t3.decode" in opt.last.kernels


def test_the_wrapper_on_an_english_only_model_refuses_another_language(tiny_tts: ChatterboxTTS) -> None:
    """Before 2026-12-07 the wrapper took ``language_id="fr"`` on the standard model and spoke
    English (its text tokens ignored the language); English itself is what it speaks."""
    with PerformanceOptimizedTTS(tiny_tts, policy="float32") as opt:
        with pytest.raises(ConfigError, match="the standard model speaks English only"):
            opt.generate(TEXT, max_new_tokens=4, seed=0, language_id="fr")
        seeded = [torch.Generator().manual_seed(0) for _ in range(2)]
        spoken = [opt.speech_tokens(TEXT, 4, language_id=lang, generator=g).tokens
                  for lang, g in zip((None, "en"), seeded, strict=True)]  # fmt: skip
        assert torch.equal(*spoken)


def test_a_request_too_long_for_the_wrappers_cache_names_the_wrappers_fix(tiny_tts: ChatterboxTTS) -> None:
    with PerformanceOptimizedTTS(tiny_tts, policy="float32", decode="static", max_cache_len=128) as opt:
        with pytest.raises(CacheError, match=r"set_max_cache_len\(\d+\) \(or decode='eager'\)"):
            opt.speech_tokens(TEXT, max_new_tokens=200)


def test_a_cache_resized_during_a_generate_applies_from_the_next_one(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before 2026-12-05 a generate checked against the old length built its static step with the
    new one (a RuntimeError on tensor sizes). The generate is held in its prefill while the
    cache is resized."""
    import threading

    sizes: list[int] = []

    class Sized(decode_module.StaticStep):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            sizes.append(kwargs["max_cache_len"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(decode_module, "StaticStep", Sized)
    long = "Hello there, this is a test of a somewhat longer sentence to speak."
    in_prefill, resized = threading.Event(), threading.Event()

    def hold(*_a: object) -> None:
        if threading.current_thread().name == "generating" and not in_prefill.is_set():
            in_prefill.set()
            resized.wait(60)

    got: list[object] = []

    def run(opt: PerformanceOptimizedTTS) -> None:
        try:
            got.append(opt.generate(long, max_new_tokens=40, seed=0))
        except Exception as e:  # noqa: BLE001 - what the caller got is the result
            got.append(e)

    with PerformanceOptimizedTTS(tiny_tts, policy="float32", decode="static", max_cache_len=512) as opt:
        assert opt.prefill_length(long) > 80 >= positions_needed(opt.prefill_length(TEXT), 8)
        hook = tiny_tts.t3.tfmr.register_forward_hook(hold)
        try:
            runner = threading.Thread(target=run, args=(opt,), name="generating")
            runner.start()
            assert in_prefill.wait(60)
            opt.set_max_cache_len(80)
        finally:
            resized.set()
            hook.remove()
        runner.join(120)
        assert len(got) == 1 and isinstance(got[0], torch.Tensor), got  # with the size it started with
        opt.generate(TEXT, max_new_tokens=8, seed=0)
        assert sizes == [512, 80] and opt.plan.static_step(2).max_cache_len == 80


def test_a_generation_refused_by_a_paused_stream_names_the_wrappers_fix(tiny_tts: ChatterboxTTS) -> None:
    # It used to say step='eager', an argument the wrapper does not take.
    with PerformanceOptimizedTTS(tiny_tts, policy="float32", decode="static") as opt:
        config = StreamConfig("buffered", first_window_s=0.2, window_s=0.2)
        paused = opt.generate_stream(TEXT, config=config, max_new_tokens=40)
        next(paused)
        with pytest.raises(CacheError, match="decode='eager'"):
            opt.generate(TEXT, max_new_tokens=4)
        paused.close()


@pytest.mark.parametrize("policy", ["float32", "bfloat16"])
def test_an_exaggeration_asked_again_keeps_the_voice_as_it_is(tiny_tts: ChatterboxTTS, policy: str) -> None:
    # Upstream compares it with the tensor's value in the tensor's dtype: 0.7 is not rebuilt
    # (and the conditionals cast again) on every call because float32 0.7 != 0.7.
    with PerformanceOptimizedTTS.from_model(tiny_tts, dtype=policy) as opt:
        assert opt.tts.conds is not None
        t3_cond = opt.tts.conds.t3
        before = t3_cond.emotion_adv
        opt._voice("Hi.", None, 0.7)
        once = opt.tts.conds.t3.emotion_adv
        opt._voice("Hi.", None, 0.7)
        assert once is not before and opt.tts.conds.t3.emotion_adv is once
        assert t3_cond.emotion_adv is before  # new conditionals, the earlier ones as they were


def test_a_sampled_start_token_cuts_the_audio_as_upstreams_generate_does(
    tiny_tts: ChatterboxTTS, steer: type[Steer]
) -> None:
    # upstream's drop_invalid_tokens vocodes only what follows a start-of-speech id (random
    # weights sample it); the wrapper vocoded the ids before it too
    start = tiny_tts.t3.hp.start_speech_token
    upstream = UpstreamTTS(tiny_tts)
    with shadow(tiny_tts.t3.speech_head, "forward", steer({4: start})):
        want = upstream.generate(TEXT, max_new_tokens=30, seed=0)
    with PerformanceOptimizedTTS(tiny_tts, policy="float32", decode="eager") as opt:
        with shadow(tiny_tts.t3.speech_head, "forward", steer({4: start})):
            got = opt.generate(TEXT, max_new_tokens=30, seed=0)
    assert torch.equal(got, want)


def test_the_baselines_stream_speaks_with_the_exaggeration_asked(tiny_tts: ChatterboxTTS) -> None:
    # Before: popped and dropped for a prepared voice, so a stream comparison ran two voices.
    # What T3's conditioning encoder is given while the stream speaks, not only the model's voice
    # after it: a copy of the voice taken before the exaggeration was set spoke the old one.
    emotion = tiny_tts.conds.t3.emotion_adv
    spoken: list[float] = []
    hook = tiny_tts.t3.cond_enc.register_forward_pre_hook(
        lambda _m, args: spoken.append(float(args[0].emotion_adv.flatten()[0]))
    )
    try:
        for _ in UpstreamTTS(tiny_tts).generate_stream(TEXT, exaggeration=0.9, max_new_tokens=4):
            pass
        assert float(tiny_tts.conds.t3.emotion_adv.flatten()[0]) == pytest.approx(0.9)
    finally:
        hook.remove()
        tiny_tts.conds.t3.emotion_adv = emotion
    assert spoken and spoken == pytest.approx([0.9] * len(spoken))


def test_bfloat16_decode_copy_leaves_the_model_alone(tiny_tts: ChatterboxTTS) -> None:
    before = {k: v.clone() for k, v in tiny_tts.t3.tfmr.state_dict().items()}
    plan = DecodePlan(T3Parts.of(tiny_tts.t3), T3Parts.of(tiny_tts.t3).to(torch.bfloat16))
    r = t3_decode(tiny_tts.t3, tiny_tts.conds.t3, _text(tiny_tts), max_new_tokens=10, plan=plan)
    assert r.tokens.shape == (1, 10) and plan.describe() == "prefill float32, decode bfloat16"
    after = tiny_tts.t3.tfmr.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in before)


@pytest.mark.parametrize("ckpt", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["plain", "autocast"])
def test_no_dtype_error_for_any_checkpoint(
    folders: dict[str, Path], short_ref: Path, ckpt: str, mode: str
) -> None:
    policy = "keep" if mode == "plain" else "autocast-bfloat16"
    tts = PerformanceOptimizedTTS.from_local(folders[ckpt], dtype=policy)
    torch.manual_seed(0)
    wav = tts.generate(TEXT, max_new_tokens=10)  # conds.pt from the folder
    assert wav.dtype == torch.float32 and wav.shape[1] > 0 and torch.isfinite(wav).all()
    wav = tts.generate(TEXT, audio_prompt_path=str(short_ref), max_new_tokens=10)  # fresh voice
    assert torch.isfinite(wav).all()
    info = tts.performance_info()
    want = ckpt if mode == "plain" else "float32"
    assert info["component_dtypes"]["t3"] == want and info["component_dtypes"]["s3gen.flow"] == want
    assert info["component_dtypes"]["s3gen.mel2wav"] == "float32"  # island
    assert info["using_amp"] is (mode == "autocast")


def test_half_cast_model_runs(short_ref: Path) -> None:
    tts = load_model("tiny")
    for module in (tts.t3, tts.s3gen, tts.ve):
        module.half()  # what users try first, and what upstream cannot run
    with PerformanceOptimizedTTS.from_model(tts) as opt:  # auto: a float16 model keeps float16
        wav = opt.generate(TEXT, audio_prompt_path=str(short_ref), max_new_tokens=10)
        assert torch.isfinite(wav).all()
        assert opt.policy == "keep" and opt.performance_info()["model_dtype"] == "float16"
        assert next(tts.ve.parameters()).dtype == torch.float32  # an island: float32 even under "keep"
    # close() gives the islands back in float16: their snapshot is taken before they are cast up
    # (taken after, it would hold their float32 and put that back)
    for island in island_modules(tts):
        assert {p.dtype for p in island.parameters()} == {torch.float16}, island


def test_a_build_failing_after_the_islands_gives_the_model_back() -> None:
    """A "keep" policy is refused on mixed dtypes inside T3 once the islands are cast and shadowed:
    the constructor closes what it opened. The error is kept (``info``), as a REPL keeps
    ``sys.last_value``: let go, its frames would close the snapshot's generator and hide a leak."""
    tts = load_model("tiny")
    tts.ve.half()
    first = next(tts.t3.parameters())
    first.data = first.data.half()
    with pytest.raises(SourceError, match="mixed parameter dtypes") as info:
        PerformanceOptimizedTTS(tts, policy="keep")
    held = [frame.f_locals.get("self") for frame, _ in traceback.walk_tb(info.tb)]
    assert any(isinstance(o, PerformanceOptimizedTTS) for o in held)  # the half-built wrapper too
    assert "forward" not in vars(tts.ve)  # no island shadow left
    assert {p.dtype for p in tts.ve.parameters()} == {torch.float16}


def test_performance_info_reports_what_ran(folders: dict[str, Path]) -> None:
    tts = PerformanceOptimizedTTS.from_local(
        folders["float32"], dtype="decode-bfloat16", record_attention=True
    )
    torch.manual_seed(0)
    tts.generate(TEXT, max_new_tokens=12)
    info = tts.performance_info()
    for key in (
        "flash_attention_available",
        "model_dtype",
        "using_amp",
        "target_dtype",
        "component_dtypes",
        "float32_islands",
        "attention_configured",
        "last_generation",
        "memory",
    ):
        assert key in info
    assert info["flash_attention_available"] is False  # CPU: no CUDA Flash kernel
    assert info["target_dtype"] == "bfloat16" and info["model_dtype"] == "float32"
    decode = info["last_generation"]["kernels"]["t3.decode"]
    prefill = info["last_generation"]["kernels"]["t3.prefill"]
    # 11 decode steps after the prefill, each runs one SDPA per layer, and in the dtype of the copy.
    layers = tts.tts.t3.cfg.num_hidden_layers
    assert decode == {"flash (CPU) [bfloat16]": 11 * layers}
    assert prefill == {"flash (CPU) [float32]": layers}
    # The same generation under an independent recorder sees the same kernels.
    with record_kernels(tts.tts, extra_t3s=[tts.plan.decode]) as rec:
        tts.record_attention = False
        torch.manual_seed(0)
        tts.generate(TEXT, max_new_tokens=12)
    assert rec.by_phase(with_dtype=True)["t3.decode"] == decode
    # the speech heads, T3's and the bfloat16 copy's, in T3's phases (the copy's was "other")
    heads = rec.ops[(rec.ops["op"] == "aten::linear") & rec.ops["input_shapes"].str.contains("8194")]
    assert set(heads["dtype"]) == {"float32", "bfloat16"}
    # (this loop runs the head on the prefill's last position only: one position, so t3.decode)
    assert set(heads["phase"]) == {"t3.decode"}
    assert info["memory"]["parameter_bytes"]["t3.decode_copy"] * 2 == pytest.approx(
        info["memory"]["parameter_bytes"]["t3"], rel=0.35
    )
    assert info["memory"]["peak_rss_bytes"] > 0


def test_flash_is_not_available_to_a_multilingual_models_eager_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager step of a Multilingual model runs upstream's alignment analyzer, which switches T3
    to eager attention for each generation: no SDPA, so no Flash, whatever torch would take (before
    2026-12-05 the wrapper read the configured sdpa and, on CUDA in bfloat16, said Flash ran)."""
    pretend_cuda(monkeypatch, lambda *_a, **_k: True)  # torch's CUDA check, taking every input
    tts = load_model("multilingual-tiny")
    available = {}
    for decode in ("eager", "static"):  # the static step decodes without the analyzer
        with PerformanceOptimizedTTS(tts, policy="float32", decode=decode) as opt:
            available[decode] = opt.performance_info()["flash_attention_available"]
    assert available == {"eager": False, "static": True}


def test_float16_export_halves_parameter_bytes(folders: dict[str, Path]) -> None:
    full = PerformanceOptimizedTTS.from_local(folders["float32"], dtype="keep").performance_info()
    half = PerformanceOptimizedTTS.from_local(folders["float16"]).performance_info()
    b32, b16 = full["memory"]["parameter_bytes"], half["memory"]["parameter_bytes"]
    assert half["policy"] == "keep" and half["model_dtype"] == "float16"
    assert b16["t3"] * 2 == b32["t3"]
    assert b16["s3gen"] < b32["s3gen"]  # the flow halves; tokenizer, CAMPPlus and HiFT stay float32
    assert b16["ve"] == b32["ve"]  # an island


def test_auto_policy_measures_and_picks_the_fastest(folders: dict[str, Path]) -> None:
    tts = PerformanceOptimizedTTS.from_local(folders["float32"])
    measured = tts.policy_choice.measured
    assert set(measured) == {"float32", "decode-bfloat16"}
    # Each phase is a torch.utils.benchmark Measurement over 3 synchronised runs: it has a spread.
    assert all(len(m[p].times) == 3 and m[p].median > 0 for m in measured.values() for p in m)

    def cost(c: str) -> float:
        return measured[c]["prefill_s"].median + 200 * measured[c]["step_s"].median

    assert tts.policy == min(measured, key=cost)
    assert "measured" in tts.policy_choice.reason
    assert tts.performance_info()["policy_measured"] == tts.policy_choice.summary()


def test_optimize_false_is_upstream(folders: dict[str, Path]) -> None:
    up = load_model(str(folders["float16"]))
    up.t3.float(), up.s3gen.float(), up.ve.float()  # what upstream from_local's load_state_dict does
    torch.manual_seed(3)
    want = generate(up, TEXT, max_new_tokens=20, seed=3).wav
    plain = PerformanceOptimizedTTS.from_local(folders["float16"], optimize=False)
    assert plain.performance_info()["model_dtype"] == "float32"  # upstream upcasts
    torch.manual_seed(3)
    got = plain.generate(TEXT, max_new_tokens=20)
    assert torch.equal(got[0], torch.from_numpy(want))


def test_unknown_policy(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unknown dtype policy 'half'.*float16"):
        PerformanceOptimizedTTS.from_local(folders["float32"], dtype="half")


def test_cuda_without_cuda(folders: dict[str, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SourceError, match="CUDA is not available"):
        PerformanceOptimizedTTS.from_local(folders["float32"], device="cuda")


def test_mixed_dtypes_inside_one_file_are_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(folders["float32"], tmp_path / "mixed"))
    state = load_file(folder / "t3_cfg.safetensors")
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first].half()
    save_file(state, str(folder / "t3_cfg.safetensors"))
    # before: "(e.g. dtype='float32')", which the constructor takes as policy= (a TypeError)
    fixes = r"policy='float32'.*from_local\(.*dtype='float32'.*--dtype float32"
    with pytest.raises(SourceError, match=f"mixed parameter dtypes.*float16.*{fixes}"):
        PerformanceOptimizedTTS.from_local(folder, dtype="keep")
    assert PerformanceOptimizedTTS.from_local(folder, dtype="float32").policy == "float32"  # casts


def test_mixed_dtypes_across_files_each_keep_theirs(folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(folders["float32"], tmp_path / "across"))
    shutil.copy(folders["float16"] / "t3_cfg.safetensors", folder / "t3_cfg.safetensors")
    tts = PerformanceOptimizedTTS.from_local(folder, dtype="keep")
    assert torch.isfinite(tts.generate(TEXT, max_new_tokens=10)).all()
    dtypes = tts.performance_info()["component_dtypes"]
    assert dtypes["t3"] == "float16" and dtypes["s3gen.flow"] == "float32"


def test_auto_keeps_a_half_precision_flow_beside_a_float32_t3(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """Before 2026-12-05 "auto" looked at T3's dtype only: a float16 flow beside a float32 T3 was
    measured as a float32 checkpoint, and the flow cast up to float32."""
    import shutil

    folder = Path(shutil.copytree(folders["float32"], tmp_path / "half_flow"))
    shutil.copy(folders["float16"] / "s3gen.safetensors", folder / "s3gen.safetensors")
    with PerformanceOptimizedTTS.from_local(folder) as tts:
        info = tts.performance_info()
        assert torch.isfinite(tts.generate(TEXT, max_new_tokens=10)).all()
    assert info["policy"] == "keep" and not info["policy_measured"]
    assert info["component_dtypes"]["s3gen.flow"] == "float16" and info["component_dtypes"]["t3"] == "float32"
    assert "float16 in s3gen.flow" in info["policy_reason"] and "no upcast" in info["policy_reason"]


def test_conds_from_another_model_are_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(folders["float32"], tmp_path / "conds"))
    conds = Conditionals.load(folder / "conds.pt")
    conds.t3.speaker_emb = torch.zeros(1, 512)  # a speaker embedding of another width
    conds.save(folder / "conds.pt")
    with pytest.raises(SourceError, match="t3.speaker_emb is width 512, the model expects 256"):
        PerformanceOptimizedTTS.from_local(folder)


def test_s3gen_with_exact_ids_matches_upstream_in_float32(tiny_tts: ChatterboxTTS) -> None:
    tokens = torch.arange(40) * 150 % 6561
    gen = dict(tiny_tts.conds.gen)
    torch.manual_seed(5)
    want, _ = tiny_tts.s3gen.inference(speech_tokens=tokens, ref_dict=dict(gen))
    torch.manual_seed(5)
    assert torch.equal(s3gen_inference(tiny_tts.s3gen, tokens, gen), want)


def _state(tts: ChatterboxTTS) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": v.clone()
        for n, m in (("ve", tts.ve), ("t3", tts.t3), ("s3gen", tts.s3gen))
        for k, v in m.state_dict().items()
    }


@pytest.mark.parametrize(
    ("policy", "away"),
    [("bfloat16", False), ("decode-bfloat16", False), ("autocast-bfloat16", False), ("bfloat16", True)],
)
def test_close_gives_the_model_back_exactly(
    reference_wav: Path, policy: str, away: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # away: as on a GPU, the originals the cast replaced are copied off the model's device while
    # open (every tensor counts as elsewhere here: on this CPU none would be) and copied back
    monkeypatch.setattr(patching, "_elsewhere", lambda t, to: away)
    tts = load_model("tiny", seed=0)
    tts.prepare_conditionals(str(reference_wav))
    want = generate(tts, TEXT, max_new_tokens=12, seed=5).wav  # (upstream adds t3.patched_model)
    before, conds = _state(tts), tts.conds
    speaker = conds.t3.speaker_emb.clone()
    owners = (tts.ve, tts.s3gen, tts.s3gen.mel2wav, tts.s3gen.tokenizer, tts.s3gen.speaker_encoder)
    attrs = [dict(vars(m)) for m in owners]  # the instances' own attributes (upstream sets some)
    with PerformanceOptimizedTTS(tts, policy=policy) as opt:
        opt.generate(TEXT, max_new_tokens=8)
        assert "forward" in vars(tts.ve)  # an island's shadow is installed while open
        if policy == "bfloat16":  # a half policy casts S3Gen's flow with T3
            assert next(tts.t3.parameters()).dtype == torch.bfloat16
            assert opt.configuration()["component_dtypes"]["s3gen.flow"] == "bfloat16"
        # only what a cast replaced is released: nothing where the weights stay float32
        assert (opt.released_bytes > 0) == (away and policy == "bfloat16")
    after = _state(tts)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    for m, before_attrs in zip(owners, attrs, strict=True):  # every shadowed method is gone
        assert vars(m).keys() == before_attrs.keys()
        assert all(vars(m)[k] is v for k, v in before_attrs.items() if callable(v))
    assert tts.conds is conds and torch.equal(conds.t3.speaker_emb, speaker)
    assert conds.t3.speaker_emb.dtype == torch.float32
    got = generate(tts, TEXT, max_new_tokens=12, seed=5).wav  # upstream on it: as before wrapping
    assert np.array_equal(got, want)


def test_the_wrapper_does_not_record_kernels_unless_asked(tiny_tts: ChatterboxTTS) -> None:
    with PerformanceOptimizedTTS(tiny_tts, policy="float32") as opt:
        opt.generate(TEXT, max_new_tokens=4)
        assert opt.last.kernels == {}  # no profiler in the fast path
        opt.record_attention = True
        opt.generate(TEXT, max_new_tokens=4)
        assert "t3.decode" in opt.last.kernels


def test_wrapper_decode_steps_share_weights_and_reuse_the_compiled_step(
    tiny_tts: ChatterboxTTS, traced_only: None
) -> None:
    from tts_workbench.core.errors import ConfigError

    with PerformanceOptimizedTTS(tiny_tts, policy="float32", decode="compiled") as opt:
        assert opt.configuration()["decode_step"] == "compiled"
        first = opt.speech_tokens(TEXT, max_new_tokens=12, decode="eager")
        torch.manual_seed(0)
        eager = opt.speech_tokens(TEXT, max_new_tokens=12, decode="eager").tokens
        torch.manual_seed(0)
        opt.generate(TEXT, max_new_tokens=12, seed=0)
        assert opt.last.decode_step == "compiled" and opt.last.seconds["t3.compile"] > 0
        # generate's sampling defaults are upstream ChatterboxTTS.generate's (top_p 1.0), not
        # T3.inference's (0.95): the step samples inside its graph, so other settings compile
        # a graph of their own, once, timed as compiling
        torch.manual_seed(0)
        other = opt.speech_tokens(TEXT, max_new_tokens=12)
        assert other.compile_s > 0 and torch.equal(other.tokens, eager)
        torch.manual_seed(0)
        again = opt.speech_tokens("A different, longer sentence to speak.", max_new_tokens=12)
        assert again.compile_s == 0.0 and again.step_mode == "compiled"  # built once, reused
        torch.manual_seed(0)
        assert torch.equal(opt.speech_tokens(TEXT, max_new_tokens=12).tokens, eager)
        assert opt.configuration()["kv_cache_bytes"] > 0
        assert opt.plans["compiled"].decode is opt.plans["eager"].decode  # one set of weights
        assert first.step_mode == "eager"
    with pytest.raises(ConfigError, match="unknown decode step"):
        PerformanceOptimizedTTS(tiny_tts, policy="float32", decode="fast")


def test_close_from_another_thread_waits_for_the_chunk_being_made(
    tiny_tts: ChatterboxTTS, reference_wav: Path
) -> None:
    """Before 2026-12-04 close() gave the model back (float32) under a chunk another thread was
    making with the bfloat16 decode copy: the reader failed with a dtype mismatch."""
    import threading

    making, release = threading.Event(), threading.Event()

    def hold(*_a: object) -> None:  # T3's prefill, inside the first chunk's making, waits to be let go
        making.set()
        assert release.wait(60)

    opt = PerformanceOptimizedTTS(tiny_tts, policy="decode-bfloat16", decode="static")
    opt.prepare_conditionals(str(reference_wav))
    chunks = opt.generate_stream(TEXT, config=StreamConfig("buffered", first_window_s=0.2, window_s=0.2),
                                 max_new_tokens=40)  # fmt: skip
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in chunks:
                pass
        except BaseException as e:  # noqa: BLE001 - what the reader got is the result
            errors.append(e)

    hook = tiny_tts.t3.tfmr.register_forward_pre_hook(hold)  # (the decode steps run a bfloat16 copy)
    try:
        reader = threading.Thread(target=read)
        reader.start()
        assert making.wait(60)
        closer = threading.Thread(target=opt.close)
        closer.start()
        closer.join(0.5)
        assert closer.is_alive() and not opt.closed  # waiting for the chunk, the model still wrapped
        release.set()
        closer.join(60)
        reader.join(60)
    finally:
        release.set()
        hook.remove()
        opt.close()  # (a no-op once closed)
    assert opt.closed and len(errors) == 1 and isinstance(errors[0], ConfigError), errors
    assert "was closed" in str(errors[0]) and next(tiny_tts.t3.parameters()).dtype == torch.float32


def test_close_from_another_thread_waits_for_a_call_in_progress(
    tiny_tts: ChatterboxTTS, short_ref: Path
) -> None:
    """Before 2026-12-05 close() waited only for stream chunks: it gave the model back under a
    generate another thread was running, whose new voice then replaced the caller's conditionals
    for good. The generate is held in the voice encoder and let go only once close() waits."""
    import threading

    inside, release = threading.Event(), threading.Event()

    def hold(*_a: object) -> None:
        inside.set()
        assert release.wait(60)

    class Watched(threading.Condition):
        def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
            if not predicate():  # close() waits for the call: let the call go on
                release.set()
            return super().wait_for(predicate, timeout)

    conds = tiny_tts.conds
    opt = PerformanceOptimizedTTS(tiny_tts, policy="bfloat16", decode="eager")
    opt._made = Watched()
    got: list[object] = []

    def run() -> None:
        try:
            got.append(opt.generate(TEXT, audio_prompt_path=str(short_ref), max_new_tokens=4, seed=0))
        except Exception as e:  # noqa: BLE001 - what the caller got is the result
            got.append(e)

    hook = tiny_tts.ve.register_forward_pre_hook(hold)
    try:
        runner = threading.Thread(target=run)
        runner.start()
        assert inside.wait(60)
        closer = threading.Thread(target=opt.close)
        closer.start()
        closer.join(60)
        release.set()  # (before the fix close() had returned by now: the call goes on after it)
        runner.join(60)
    finally:
        release.set()
        hook.remove()
        opt.close()
    assert not closer.is_alive() and not runner.is_alive() and opt.closed
    assert tiny_tts.conds is conds  # the caller's voice, as it was
    assert {p.dtype for m in (tiny_tts.t3, tiny_tts.s3gen) for p in m.parameters()} == {torch.float32}
    assert len(got) == 1 and isinstance(got[0], torch.Tensor), got  # the call under way finished


def test_a_second_close_in_another_thread_waits_for_the_first(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, a close() while another was giving the model back tore down again: its report,
    of the model given back (float32), was kept as the wrapper's. The second close() is started
    once the first has given the model back, and the first goes on once the second waits (or,
    before the fix, has returned)."""
    import threading

    opt = PerformanceOptimizedTTS(tiny_tts, policy="bfloat16", decode="eager")
    settled = threading.Event()  # the second close() waits for the first, or has returned

    class Watched(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            if threading.current_thread().name == "second":
                settled.set()
            return super().wait(timeout)

    opt._made = Watched()
    errors: list[BaseException] = []

    def close_second() -> None:
        try:
            opt.close()
        except BaseException as e:  # noqa: BLE001 - what the caller got is the result
            errors.append(e)
        finally:
            settled.set()

    second = threading.Thread(target=close_second, name="second")
    give_back = opt._stack.close

    def slowly() -> None:
        give_back()
        if not second.is_alive() and not settled.is_set():  # the first close() only
            second.start()
            assert settled.wait(60)

    monkeypatch.setattr(opt._stack, "close", slowly)
    opt.close()
    second.join(60)
    assert not second.is_alive() and not errors and opt.closed
    assert opt.configuration()["component_dtypes"]["t3"] == "bfloat16"  # the wrapper's, not the model's
    assert next(tiny_tts.t3.parameters()).dtype == torch.float32


def test_close_inside_the_wrappers_own_call_is_refused(tiny_tts: ChatterboxTTS, short_ref: Path) -> None:
    """close() waits for the calls in progress: from inside one (a hook, here) it would wait for
    itself, so it is refused, and the call fails with the reason."""
    opt = PerformanceOptimizedTTS(tiny_tts, policy="float32")
    hook = tiny_tts.ve.register_forward_pre_hook(lambda *_a: opt.close())
    try:
        with pytest.raises(ConfigError, match="close.. inside .* after the call returns"):
            opt.prepare_conditionals(str(short_ref))
        assert not opt.closed
    finally:
        hook.remove()
        opt.close()
    assert opt.closed


def test_close_inside_a_streams_own_chunk_is_refused(reference_wav: Path) -> None:
    """A chunk being made is waited for by close(): from inside it (a hook while the stream is
    read) close() would wait for itself. It hung there for good (before 2026-12-05: the refusal
    looked only at the public calls, and the stream's ``generate_stream`` call had returned)."""
    import threading

    tts = voiced("tiny", reference_wav)  # its own model: a close() hung here would hold the model
    opt = PerformanceOptimizedTTS(tts, policy="float32", decode="eager")
    chunks = opt.generate_stream(TEXT, config=StreamConfig("buffered", first_window_s=0.2, window_s=0.4),
                                 max_new_tokens=20, seed=2)  # fmt: skip
    got: list[object] = []

    def read() -> None:
        try:
            got.extend(chunk for chunk, _ in chunks)
        except Exception as e:  # noqa: BLE001 - what the reader got is the result
            got.append(e)

    hook = tts.t3.tfmr.register_forward_pre_hook(lambda *_a: opt.close())
    reader = threading.Thread(target=read, daemon=True)  # (daemon: before the fix it never ended)
    try:
        reader.start()
        reader.join(30)
        assert not reader.is_alive(), "close() inside the stream's chunk waited for that chunk"
        assert got and isinstance(got[-1], ConfigError), got
        assert "close() inside" in str(got[-1]) and "after the call returns" in str(got[-1])
        assert not opt.closed
    finally:
        hook.remove()
        if not reader.is_alive():  # (a close() hung in the reader would hold this one too)
            opt.close()
    assert opt.closed


def test_close_from_another_thread_closes_the_stream_whose_chunk_it_waited_for(
    reference_wav: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() waits for a chunk being made in another thread, then ends that stream too: a
    multilingual eager stream has T3 switched to eager attention, with output_attentions on and
    spies hooked on every layer's attention. Before 2026-12-05 close() left that stream open and
    returned with them still on the model given back, until the reader asked for a chunk again.
    The second chunk's S3Gen call is held until close() waits for it."""
    import threading

    tts = voiced("multilingual-tiny", reference_wav)
    attention = tts.t3.tfmr.config

    def spies() -> int:
        return sum(len(layer.self_attn._forward_hooks) for layer in tts.t3.tfmr.layers)

    inside, release = threading.Event(), threading.Event()
    calls: list[int] = []
    s3gen = streaming._s3gen

    def held(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the second chunk's, made by the reader after the first is read
            inside.set()
            assert release.wait(60)
        return s3gen(*args, **kwargs)

    class Watched(threading.Condition):
        def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
            if not predicate():  # close() waits for the chunk: let the chunk go on
                release.set()
            return super().wait_for(predicate, timeout)

    monkeypatch.setattr(streaming, "_s3gen", held)
    opt = PerformanceOptimizedTTS(tts, policy="float32", decode="eager", flow="eager")
    opt._made = Watched()
    config = StreamConfig("buffered", first_window_s=0.2, window_s=0.4)
    chunks = opt.generate_stream("Hello there, streaming test.", config=config, max_new_tokens=30, seed=2)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.extend((next(chunks), next(chunks))))
    try:
        reader.start()
        assert inside.wait(60)
        assert (attention._attn_implementation, attention.output_attentions) == ("eager", True)  # running
        closer = threading.Thread(target=opt.close)
        closer.start()
        closer.join(60)
        reader.join(60)
        assert not closer.is_alive() and not reader.is_alive() and opt.closed and len(got) == 2
        # the reader has not asked for another chunk: close() itself gave the attention back
        assert attention._attn_implementation == "sdpa" and not attention.output_attentions
        assert spies() == 0
        with pytest.raises(ConfigError, match="was closed"):
            next(chunks)
    finally:
        release.set()
        opt.close()


def test_a_reader_stopped_while_close_ends_its_stream_gets_the_closed_error(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() ends a stream between chunks while its reader, stopped by the closed error, ends it
    too. Before 2026-12-05 the two closed the generator at once: one failed with "generator
    already executing" (the reader, here; a close() that failed so left the model wrapped). The
    stream's end, run by close(), is held until the reader has begun to end it too."""
    import threading

    ending, trying = threading.Event(), threading.Event()
    me = threading.get_ident()

    def chunks(*_a: object, **_k: object) -> Iterator[tuple[np.ndarray, None]]:
        try:
            while True:
                yield np.zeros(4, np.float32), None
        finally:
            if threading.get_ident() != me:  # close()'s end of the stream waits for the reader's
                ending.set()
                assert trying.wait(60)

    class Watched:  # the lock a stream is closed under: says when the reader asks for it
        def __init__(self) -> None:
            self.lock = threading.RLock()

        def __enter__(self) -> bool:
            if threading.get_ident() == me:
                trying.set()
            return self.lock.__enter__()

        def __exit__(self, *exc: object) -> None:
            self.lock.__exit__(*exc)

    monkeypatch.setattr(optimized, "stream", chunks)
    opt = PerformanceOptimizedTTS(tiny_tts, policy="float32")
    opt._ending = Watched()  # type: ignore[assignment]
    errors: list[BaseException] = []

    def close() -> None:
        try:
            opt.close()
        except BaseException as e:  # noqa: BLE001 - what the caller got is the result
            errors.append(e)

    read = opt.generate_stream(TEXT, max_new_tokens=4)
    next(read)
    closer = threading.Thread(target=close)
    try:
        closer.start()
        assert ending.wait(60)
        with pytest.raises(ConfigError, match="was closed"):
            next(read)
    finally:
        trying.set()  # (before the fix the reader failed without asking for the lock)
        closer.join(60)
    assert not closer.is_alive() and not errors and opt.closed


def test_a_close_between_a_readers_open_check_and_its_chunk_gives_it_the_closed_error(
    tiny_tts: ChatterboxTTS, reference_wav: Path
) -> None:
    """The reader checks that the wrapper is open under its lock, then makes the chunk outside it.
    A close() in between closed the stream under its maker (before 2026-12-04): the stream ended
    early as if whole, or failed with "generator already executing". Now close() leaves a
    stream being made to finish its chunk, and its reader gets the ConfigError at the next one.
    The reader is held just after the lock (where a thread switch can fall) by a Condition that
    waits there for the closer."""
    import threading

    paused, closer_waits = threading.Event(), threading.Event()
    opt = PerformanceOptimizedTTS(tiny_tts, policy="float32")

    class Gate(threading.Condition):
        def __enter__(self) -> bool:
            if threading.current_thread().name == "closer" and opt._closing:
                closer_waits.set()  # close() is past closing the idle streams: it waits now
            return super().__enter__()

        def __exit__(self, *exc: object) -> None:
            super().__exit__(*exc)
            if threading.current_thread().name == "reader" and opt._making and not paused.is_set():
                paused.set()
                assert closer_waits.wait(30)

    try:
        opt.prepare_conditionals(str(reference_wav))
        opt._made = Gate()
        chunks = opt.generate_stream(TEXT, config=StreamConfig("buffered", first_window_s=0.2, window_s=0.2),
                                     max_new_tokens=20)  # fmt: skip
        got: list[object] = []

        def read() -> None:
            try:
                got.extend(chunk for chunk, _ in chunks)
                got.append("ended as if whole")
            except Exception as e:  # noqa: BLE001 - what the reader got is the result
                got.append(e)

        reader = threading.Thread(target=read, name="reader")
        reader.start()
        assert paused.wait(60)
        closer = threading.Thread(target=opt.close, name="closer")
        closer.start()
        closer.join(60)
        reader.join(60)
    finally:
        closer_waits.set()
        opt.close()
    assert not reader.is_alive() and opt.closed
    assert isinstance(got[-1], ConfigError) and "was closed" in str(got[-1]), got[-1]
    assert len(got) == 2  # the chunk under way was made and read, then the error


def test_last_run_is_a_copy_and_options_are_named_as_from_model_takes_them(tiny_tts: ChatterboxTTS) -> None:
    with PerformanceOptimizedTTS(tiny_tts, policy="float32") as opt:
        opt.generate(TEXT, max_new_tokens=4, seed=0)
        first = opt.last_run()["last_generation"]
        first["tokens"] = -1  # before 2026-12-04 the wrapper's own record, changed through it
        assert opt.last_run()["last_generation"]["tokens"] != -1
        # a stream's report labelled with another strategy is refused (it was kept: a buffered
        # stream reported as naive)
        with pytest.raises(ConfigError, match="labelled 'naive'"):
            next(opt.generate_stream(TEXT, max_new_tokens=4, state=StreamState(StreamReport("naive"))))
    with pytest.raises(ConfigError, match="dtype="):  # before, a TypeError: two values for policy
        PerformanceOptimizedTTS.from_model(tiny_tts, policy="float32")


def _two_voices(tmp_path: Path) -> list[str]:
    return [str(make_reference_wav(tmp_path / f"v{i}.wav", seconds=3.0, seed=i)) for i in (1, 2)]


def _both_prepared_first(tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch, meeting: MeetingOn) -> None:
    """Upstream ``prepare_conditionals`` on ``tts`` waits, once done, for the other thread's: both
    voices are written before either call reads one (``Meeting``: a call waiting for its turn
    lets the call in turn go on)."""
    met = meeting(tts)
    prepare = tts.prepare_conditionals

    def prepared_then_met(*args: Any, **kwargs: Any) -> None:
        prepare(*args, **kwargs)
        met.wait()

    monkeypatch.setattr(tts, "prepare_conditionals", prepared_then_met)


def _in_two_threads(calls: list[Callable[[], Any]]) -> dict[int, Any]:
    """What each of ``calls``, run at once in threads of their own, returned."""
    import threading

    got: dict[int, Any] = {}

    def run(i: int) -> None:
        got[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(got) == list(range(len(calls))), "a call failed"
    return got


def _streamed(chunks: Iterator[tuple[np.ndarray, Any]]) -> np.ndarray:
    return np.concatenate([chunk for chunk, _ in chunks])


def test_two_generates_in_two_threads_speak_their_own_voices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meeting: MeetingOn
) -> None:
    """Before 2026-12-05 the wrapper's voice write took no turn: with both voices prepared before
    either decoded, both generates spoke the voice prepared last."""
    refs = _two_voices(tmp_path)
    tts = load_model("tiny")
    with PerformanceOptimizedTTS(tts, policy="float32", decode="eager", flow="eager") as opt:

        def speak(i: int) -> np.ndarray:
            return opt.generate(TEXT, refs[i], max_new_tokens=8, seed=0).numpy()

        solo = [speak(i) for i in (0, 1)]
        assert not np.array_equal(*solo)
        _both_prepared_first(tts, monkeypatch, meeting)
        together = _in_two_threads([lambda: speak(0), lambda: speak(1)])
    for i in (0, 1):
        assert np.array_equal(together[i], solo[i]), f"thread {i}"


def test_a_stream_and_a_generate_in_two_threads_speak_their_own_voices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meeting: MeetingOn
) -> None:
    """Before 2026-12-05 a generate_stream's voice write and copy took no turn: the stream or the
    generate beside it spoke the other's voice."""
    refs = _two_voices(tmp_path)
    tts = load_model("tiny")
    with PerformanceOptimizedTTS(tts, policy="float32", decode="eager", flow="eager") as opt:

        def streamed() -> np.ndarray:
            return _streamed(opt.generate_stream(TEXT, refs[0], max_new_tokens=8, seed=0))

        def spoken() -> np.ndarray:
            return opt.generate(TEXT, refs[1], max_new_tokens=8, seed=0).numpy()

        solo = [streamed(), spoken()]
        _both_prepared_first(tts, monkeypatch, meeting)
        together = _in_two_threads([streamed, spoken])
    for i in (0, 1):
        assert np.array_equal(together[i], solo[i]), f"thread {i}"


def test_upstream_stream_beside_upstream_generate_speaks_each_voice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meeting: MeetingOn
) -> None:
    """Before 2026-12-05 UpstreamTTS.generate_stream wrote its voice outside the baseline's turn:
    the generate in turn spoke the stream's voice, or the stream the generate's."""
    refs = _two_voices(tmp_path)
    up = UpstreamTTS(load_model("tiny"))
    solo = up.generate(TEXT, refs[0], max_new_tokens=8, seed=0).numpy()
    solo_stream = _streamed(up.generate_stream(TEXT, refs[1], max_new_tokens=8, seed=0))
    _both_prepared_first(up.tts, monkeypatch, meeting)
    together = _in_two_threads(
        [
            lambda: up.generate(TEXT, refs[0], max_new_tokens=8, seed=0).numpy(),
            lambda: up.generate_stream(TEXT, refs[1], max_new_tokens=8, seed=0),
        ]
    )
    assert np.array_equal(together[0], solo)
    assert np.array_equal(_streamed(together[1]), solo_stream)  # read after both returned
