"""The diagnosis's decode-step check: sized for the text it is given, refused before anything
runs where no cache could hold it; the report's reading of a run that reached its token cap."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from tts_workbench.core.clock import FEW_REPEATS, measurement
from tts_workbench.core.constants import RANDOM_NO_STOP
from tts_workbench.core.errors import CacheError, NoVoiceError
from tts_workbench.core.quiet import upstream_bars_off
from tts_workbench.interface.cli import main
from tts_workbench.models.sources import load_model, token_cap_note
from tts_workbench.runtime.decode import DEFAULT_MAX_CACHE_LEN, prefill_length, text_tokens
from tts_workbench.runtime.generation import generate, prepare_voice
from tts_workbench.runtime.precision import restored
from tts_workbench.studies import diagnose
from tts_workbench.studies.diagnose import (
    decode_step_kernels,
    diagnose_precision,
    format_attention,
    format_precision,
    format_report,
    policy_frame,
    precision_frame,
    run_diagnosis,
)

if TYPE_CHECKING:
    from chatterbox.tts import ChatterboxTTS

# About 1800 characters: a prefill past the default static cache of 1536 positions
LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog, and then it rests."] * 28)


def test_the_text_is_longer_than_the_default_cache(tiny_tts: ChatterboxTTS) -> None:
    """What the tests below stand on."""
    assert prefill_length(tiny_tts, LONG_TEXT) > DEFAULT_MAX_CACHE_LEN


def test_the_decode_step_of_a_long_text_runs_in_a_cache_that_holds_it(tiny_tts: ChatterboxTTS) -> None:
    """``profile --decode static`` checks the step this way too (before: refused, telling a
    command-line user to "set plan.max_cache_len >= 1654")."""
    found = decode_step_kernels(tiny_tts, LONG_TEXT, "static", tokens=2)
    assert found == {"step": "static", "kernels": ["flash (CPU)"], "found_by": "torch.profiler op records"}


def test_a_compiled_step_whose_compile_failed_reports_the_kernels_the_static_step_ran(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(before 2026-12-05: "(compile failed: the static step ran)", found by "Inductor's generated
    code", which read nothing, and the reason only in a warning)"""

    def no_compiler(*_a: object, **_k: object) -> None:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr("tts_workbench.runtime.decode.compile_method", no_compiler)
    with pytest.warns(RuntimeWarning, match="InvalidCxxCompiler"):
        found = decode_step_kernels(tiny_tts, "Hi.", "compiled", tokens=3)
    static = decode_step_kernels(tiny_tts, "Hi.", "static", tokens=3)
    assert found["step"] == "static" and found["kernels"] == static["kernels"] == ["flash (CPU)"]
    assert found["found_by"].startswith("torch.profiler op records (compile failed: RuntimeError: ")
    assert "InvalidCxxCompiler: No working C++ compiler found" in found["found_by"]


@pytest.mark.integration  # a whole diagnosis (~14 s); the sizing itself is tested above in a second
def test_diagnose_decode_static_on_a_long_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: Path
) -> None:
    """(before: refused after the float32 generation had run and written speech.wav and
    generation.png, naming plan.max_cache_len, which no flag sets)"""
    args = ["diagnose", "--model", "tiny", "--decode", "static", "--tokens", "2", "--json"]
    args += ["--text", LONG_TEXT, "--reference", str(reference_wav), "--out", str(tmp_path)]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    report = json.loads(capsys.readouterr().out)
    assert report["decode_step"]["step"] == "static" and report["decode_step"]["kernels"]


def test_a_text_past_t3s_positions_is_refused_before_the_diagnosis_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_tts: ChatterboxTTS, reference_wav: Path
) -> None:
    """A GPT-2 backbone (Turbo's) embeds a position for every input: no cache holds a prefill past
    them, so the refusal names --text before the generation runs and anything is written."""

    def not_reached(*_a: object, **_k: object) -> None:
        raise AssertionError("the diagnosis generated before refusing")

    monkeypatch.setattr(diagnose, "load_model", lambda *_a, **_k: tiny_tts)
    monkeypatch.setattr(diagnose, "generate", not_reached)
    config, out = tiny_tts.t3.tfmr.config, tmp_path / "out"
    monkeypatch.setattr(config, "n_positions", DEFAULT_MAX_CACHE_LEN, raising=False)
    for decode in ("eager", "static"):  # no step decodes past them
        with pytest.raises(CacheError, match=r"^argument --text: .* has 1536 positions: shorten --text$"):
            run_diagnosis("tiny", LONG_TEXT, str(reference_wav), tokens=2, outdir=out, decode=decode)
    # room for 6 of the check's 20 tokens: fewer would do
    config.n_positions = prefill_length(tiny_tts, LONG_TEXT) + 5
    with pytest.raises(CacheError, match=r"shorten --text or give --tokens 6$"):
        run_diagnosis("tiny", LONG_TEXT, str(reference_wav), tokens=50, outdir=out, decode="static")
    assert not out.exists()


@pytest.mark.parametrize("step", ["eager", "static"])
def test_the_check_decodes_at_most_20_tokens_so_a_text_that_fits_them_is_not_refused(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """The CLI's default --tokens (150) is cut to the check's 20: room for those is enough. (The
    refusal above names 6 tokens however many were asked, so it did not tell whether they were cut.)"""
    prefill = prefill_length(tiny_tts, LONG_TEXT)
    monkeypatch.setattr(tiny_tts.t3.tfmr.config, "n_positions", prefill + 25, raising=False)
    plan = diagnose.decode_step_plan(tiny_tts, LONG_TEXT, step, 150)
    assert plan.step == step
    if step == "static":  # a cache past the default one, for the prefill and 20 tokens but the last
        assert plan.max_cache_len == prefill + 19


def test_profile_refuses_a_text_past_t3s_positions_before_profiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_tts: ChatterboxTTS
) -> None:
    # (before: refused after the profiled generation had run and written its trace)
    from tts_workbench.studies import profile_report

    def not_reached(*_a: object, **_k: object) -> None:
        raise AssertionError("profiled before refusing")

    monkeypatch.setattr(profile_report, "profile_run", not_reached)
    monkeypatch.setattr(tiny_tts.t3.tfmr.config, "n_positions", DEFAULT_MAX_CACHE_LEN, raising=False)
    with pytest.raises(CacheError, match=r"^argument --text: .*shorten --text$"):
        profile_report.profile_generation(tiny_tts, tmp_path, "run", 2, LONG_TEXT, decode="static")


def _capped_report(model: str) -> dict[str, Any]:
    """A report of ``model``'s run ended by its cap of 150 tokens, as ``run_diagnosis`` makes one."""
    return {
        "model": model,
        "device": "cpu",
        "torch": "2",
        "components": {"t3": {"parameters": 1, "bytes": 4, "dtypes": ["float32"]}},
        "reference": {"path": "ref.wav", "seconds": 10.0, "sample_rate": 24000, "notes": []},
        "speech_tokens": 150,
        "invalid_speech_tokens": 0,
        "stopped_by": "token cap",
        "token_cap": 150,
        "audio_s": 6.0,
        "generation_s": 9.0,
        "phase_s": {"t3": 5.0},
        "rtf": 1.5,
        "build_s": 1.0,
        "conditioning_s": 1.0,
        "wav": "speech.wav",
        "plot": "generation.png",
        "decode_step": {"step": "eager", "kernels": ["flash (CPU)"], "found_by": "torch.profiler op records"},
        "attention": {},
        "precision": {},
    }


def test_a_phases_parts_are_in_brackets_after_it_so_the_listed_seconds_add_up() -> None:
    """Before 2026-12-07: "t3 0.61s, s3gen.flow 0.42s, ..., t3.prefill 0.01s, t3.decode 0.59s",
    t3's parts beside it, the listed seconds more than the wall time. (s3gen.flow has no s3gen
    phase above it: listed on its own.)"""
    seconds = {"t3": 0.61, "s3gen.flow": 0.42, "watermark": 0.04, "t3.prefill": 0.01, "t3.decode": 0.59}
    assert diagnose.phase_line(seconds) == (
        "t3 0.61 s (prefill 0.01 s, decode 0.59 s), s3gen.flow 0.42 s, watermark 0.04 s"
    )


@pytest.mark.parametrize("model", ["pretrained", "turbo-pretrained", "/checkpoints/trained"])
def test_a_trained_model_at_the_token_cap_is_told_to_raise_tokens(
    monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    """Trained weights that reach the cap were cut off, not stuck: before 2026-12-04 the report
    blamed random weights whatever the model."""
    monkeypatch.setattr(diagnose, "format_attention", lambda *_a: "")  # not what this reads
    monkeypatch.setattr(diagnose, "format_precision", lambda *_a: "")
    lines = format_report(_capped_report(model)).splitlines()
    line = next(x for x in lines if x.startswith("speech tokens"))
    assert "random weights" not in line and "--tokens" in line and "token cap of 150" in line
    # the timing lines read their own fields: 6 s of audio in 9 s of wall time, an RTF of 1.5
    assert "audio        : 6.00 s" in lines
    assert "wall time    : 9.00 s, profiled (t3 5.00 s)" in lines
    assert any(x.startswith("RTF          : 1.50, profiled") for x in lines)
    random_line = next(
        x for x in format_report(_capped_report("tiny")).splitlines() if x.startswith("speech tokens")
    )
    assert RANDOM_NO_STOP in random_line and "--tokens" not in random_line
    # a generation whose source is not named (profile_generation without model=) says both
    assert token_cap_note(None).startswith(RANDOM_NO_STOP) and "raise --tokens" in token_cap_note(None)


@pytest.mark.integration  # a whole diagnosis of the Multilingual model (~18 s)
def test_a_multilingual_diagnosis_names_the_alignment_analyzers_eager_switch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: Path
) -> None:
    """The analyzer switches T3 to eager attention for each generation with the eager step and
    back after: the backend row and the reasons say so (before 2026-12-05 they read the restored
    configuration: "sdpa", "the flag costs nothing but is useless", no word of the analyzer)."""
    args = ["diagnose", "--model", "multilingual-tiny", "--tokens", "2", "--reference", str(reference_wav)]
    assert main([*args, "--out", str(tmp_path)]) == 0, capsys.readouterr().err[-2000:]
    rows = capsys.readouterr().out.splitlines()
    assert any(r.startswith("decode step  : eager: eager (matmul + softmax)") for r in rows)
    backend = next(r for r in rows if r.startswith("backend "))
    assert "sdpa (eager during each generation: the alignment analyzer)" in backend
    assert "useless" not in backend
    assert any(r.startswith("no Flash") and "alignment analyzer" in r for r in rows)


def test_a_long_finding_is_wrapped_under_its_column() -> None:
    """The float16 fixes ran to 256-310 characters on one line (2026-12-07); the frame keeps each
    whole (notebooks read it), the terminal text wraps it."""
    advice = "keep all of HiFT (s3gen.mel2wav) in float32 and cast the mel it gets to float32: " * 3
    stage = {"error": "RuntimeError: dtypes differ", "mismatches": [], "first_mismatch": None,
             "failure": None, "advice": advice.strip(), "calls": 9}  # fmt: skip
    prec = {"dtype": "float16", "autocast": None, "stages": {"s3gen": stage}}
    assert precision_frame(prec)["detail"].tolist() == ["RuntimeError: dtypes differ", advice.strip()]
    lines = format_precision(prec, width=60).splitlines()[2:]  # (after the title and the header)
    assert lines[0].split() == ["s3gen", "error", "RuntimeError:", "dtypes", "differ"]
    assert lines[1].split()[:2] == ["s3gen", "fix"] and all(not x.startswith("s3gen") for x in lines[2:])
    column = lines[1].index("keep")
    assert all(len(x) <= column + 60 and x[:column].strip() == "" for x in lines[2:])
    assert " ".join(x[column:] for x in lines[1:]).split() == advice.split()


def test_autocast_doing_its_work_gets_no_fix_but_its_failures_do(
    tiny_tts: ChatterboxTTS, reference_wav: Path
) -> None:
    """Under autocast a module's outputs leave its weights' dtype: that is autocast at work, not a
    fault (before: each stage that ran got a "fix", e.g. "cast the conditionals to T3's dtype"
    with weights and conditionals all float32)."""
    clean = diagnose_precision(tiny_tts, str(reference_wav), torch.float32, torch.float16, 4)
    assert clean["autocast"] == "float16"
    assert format_precision(clean).startswith("precision float32 under autocast float16 (components cast")
    # oneDNN's LSTM has no float16 kernel on some CPUs (an AVX-512 EPYC without AVX512-FP16, where
    # this test first failed): there the VoiceEncoder's LSTM raises under float16 autocast, and its
    # fix is the right finding; on an AVX2 CPU it runs.
    lstm_fails = not _lstm_runs_under_float16_autocast()
    for name, st in clean["stages"].items():
        assert st["mismatches"] and st["first_mismatch"]["mismatch"] == "autocast", name
        if lstm_fails and name == "conditioning":
            assert "LSTM" in st["error"] and "VoiceEncoder in float32 and out of autocast" in st["advice"]
            continue
        assert st["error"] is None and st["advice"] is None, (name, st["advice"])
        assert {m["mismatch"] for m in st["mismatches"]} == {"autocast"}
    frame = precision_frame(clean)
    clean_stages = frame[frame["stage"] != "conditioning"] if lstm_fails else frame
    assert list(clean_stages["finding"]) == ["ok"] * len(clean_stages) == ["ok"] * (2 if lstm_fails else 3)
    assert clean_stages["detail"].str.contains("autocast").all()
    if lstm_fails:
        assert "fix" in set(frame.query("stage == 'conditioning'")["finding"])
    # A stage that raises under autocast keeps its fix, though its first mismatch is autocast's.
    failing = diagnose_precision(tiny_tts, str(reference_wav), torch.float32, torch.bfloat16, 4)
    conditioning = failing["stages"]["conditioning"]
    assert conditioning["first_mismatch"]["mismatch"] == "autocast"
    assert "BFloat16" in conditioning["error"] and ".numpy()" in conditioning["advice"]
    assert "iSTFT" in failing["stages"]["s3gen"]["advice"]
    fixes = precision_frame(failing).query("finding == 'fix'")
    assert list(fixes["stage"]) == ["conditioning", "generate", "s3gen"]


def _lstm_runs_under_float16_autocast() -> bool:
    """Whether this CPU's oneDNN runs an LSTM under float16 autocast, without autograd as
    ``prepare_voice`` runs the VoiceEncoder (on an AVX512-FP16 Xeon oneDNN's inference LSTM runs
    in float16 and its training one raises: with autograd on this probe failed where the voice ran)."""
    try:
        with torch.autocast("cpu", torch.float16), torch.no_grad():
            torch.nn.LSTM(4, 4, batch_first=True)(torch.ones(1, 3, 4))
    except RuntimeError:
        return False
    return True


def test_float16_weights_under_bfloat16_autocast_are_told_to_stay_float32(
    tiny_tts: ChatterboxTTS, reference_wav: Path
) -> None:
    """Autocast runs T3's perceiver norm in float32, on float16 weights: before 2026-12-06 the
    generate stage was told to cast the conditionals to T3's dtype, which cannot help there."""
    report = diagnose_precision(tiny_tts, str(reference_wav), torch.float16, torch.bfloat16, 4)
    generate_stage = report["stages"]["generate"]
    assert generate_stage["failure"]["module"] == "t3.cond_enc.perceiver.attn.norm"
    advice = generate_stage["advice"]
    assert "float32" in advice and "autocast" in advice and "conditionals" not in advice, advice
    ids = text_tokens(tiny_tts, "Hi.")
    # the advice followed (T3 float32 under autocast) on a copy of the voice: T3 runs
    with restored(tiny_tts) as conds, torch.autocast("cpu", torch.bfloat16):
        assert conds is not None
        tokens = tiny_tts.t3.inference(t3_cond=conds.t3, text_tokens=ids, max_new_tokens=2)
    assert tokens.numel() > 0


def _t3_as_it_is(tts: ChatterboxTTS) -> tuple[int, list[str], Any]:
    """The forward hooks on T3's backbone, T3's state-dict keys and its upstream backend."""
    hooks = sum(len(m._forward_hooks) for m in tts.t3.tfmr.modules())
    return hooks, sorted(tts.t3.state_dict()), getattr(tts.t3, "patched_model", None)


def test_the_precision_diagnosis_gives_t3_back_without_hooks_or_a_backend(reference_wav: Path) -> None:
    """Its generate stage runs upstream's T3.inference, which asks for attentions (transformers
    hooks the backbone for good) and keeps a ``patched_model`` over T3's modules (their weights in
    ``t3.state_dict()`` a second time): before 2026-12-06 both stayed on the caller's model."""
    tts = load_model("tiny")  # not the session's model: other tests generated on it
    prepare_voice(tts, str(reference_wav))
    fresh = _t3_as_it_is(tts)
    assert fresh[0] == 0 and fresh[2] is None
    diagnose_precision(tts, str(reference_wav), torch.float32, tokens=2)
    assert _t3_as_it_is(tts) == fresh
    # After a generation of the caller's, its backend and hooks are the caller's: kept as they were.
    generate(tts, "Hi.", max_new_tokens=2, seed=0)
    generated = _t3_as_it_is(tts)
    assert generated[0] > 0 and generated[2] is not None
    diagnose_precision(tts, str(reference_wav), torch.float32, tokens=2)
    assert _t3_as_it_is(tts) == generated


def test_no_voice_names_a_fix_these_checks_take(reference_wav: Path) -> None:
    """The decode-step and precision checks take no audio_prompt_path: before, their no-voice
    error asked for one."""
    bare = load_model("tiny")
    calls = (lambda: diagnose.decode_step_plan(bare, "Hi.", "static", 3),
             lambda: diagnose.diagnose_precision(bare, str(reference_wav)))  # fmt: skip
    for call in calls:
        with pytest.raises(NoVoiceError, match=r"prepare_voice\(tts, wav\)") as refused:
            call()
        assert "audio_prompt_path" not in str(refused.value)


DIAGNOSIS_STAGES = [
    "building the model", "preparing the voice", "generating in float32", "finding the eager step's kernels",
    "writing the audio and figure", "probing attention", "precision: float32 conditioning",
    "precision: float32 generation", "precision: float32 S3Gen",
]  # fmt: skip


def test_diagnose_names_each_stage_on_stderr_as_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tiny_tts: ChatterboxTTS, reference_wav: Path,
) -> None:  # fmt: skip
    """(before 2026-12-06: nothing on stderr until the report, 23 s for a tiny model and minutes
    for a random one: the command silences upstream's own bars)"""
    monkeypatch.setattr(diagnose, "load_model", lambda *_a, **_k: tiny_tts)  # built once per session
    args = ["diagnose", "--tokens", "2", "--reference", str(reference_wav), "--out", str(tmp_path)]
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    err = captured.err
    bar = [line for line in re.split(r"[\r\n]", err) if line.startswith("diagnose:")]
    assert bar and "9/9" in bar[-1], err[-2000:]
    shown = [err.find(f", {name}]") for name in DIAGNOSIS_STAGES]  # the bar's postfix, in this order
    assert -1 not in shown and shown == sorted(shown), err[-2000:]
    # the phases, in seconds as the wall time is, ran inside it (each rounded: a millisecond's slack)
    report = json.loads(captured.out)
    phases = ("t3", "s3gen.flow", "s3gen.vocoder")
    assert sum(report["phase_s"][k] for k in phases) <= report["generation_s"] + 1e-3, report["phase_s"]
    # Called from a notebook (upstream's bars off, as notebook_setup has them) it writes nothing: a
    # saved notebook's output stays as it was. This run names a model folder (a hub snapshot): a
    # whole snapshot path as the figure's title started left of the figure and ran over the phase
    # chart's title (before 2026-12-06), so the title is the folder's name.
    folder = "/home/user/.cache/huggingface/hub/models--ResembleAI--chatterbox/snapshots/" + "0" * 40
    titles: list[str] = []
    drawn = diagnose.plots.generation_figure

    def kept(*args: Any) -> Any:
        titles.append(args[-1])
        return drawn(*args)

    monkeypatch.setattr(diagnose.plots, "generation_figure", kept)
    texts: list[str] = []
    generated = diagnose.generate

    def heard(tts: ChatterboxTTS, text: str, **kwargs: Any) -> Any:
        texts.append(text)
        return generated(tts, text, **kwargs)

    monkeypatch.setattr(diagnose, "generate", heard)
    with upstream_bars_off():
        run_diagnosis(folder, "Hi.", str(reference_wav), tokens=2, outdir=tmp_path / "quiet")
    assert capsys.readouterr().err == ""
    assert titles == ["0" * 40 + ": 2 tokens"]
    # the float32 run and the precision stage's generation both read the text given, not a default
    assert texts == ["Hi.", "Hi."]


def test_the_attention_table_shares_each_phases_whole_op_time() -> None:
    """Attention's and linear's shares are of all the phase's op time, "other" included; each
    reason Flash did not run has its row."""
    record = {
        "kernels": {"t3.decode": {"flash (CPU)": 4}},
        "time_share_ms": {"t3.decode": {"attention": 1.0, "linear/matmul": 3.0, "other": 6.0}},
    }
    att = {"backend": "sdpa", "output_attentions": {"verdict": "v"}, "forced_backends": []}
    text = format_attention(record, {**att, "why_not_flash": ["r1", "r2", "r3"]})
    row = next(line for line in text.splitlines() if line.startswith("t3.decode"))
    assert row.split()[-2:] == ["10.0", "30.0"], text
    reasons = [line.split()[-1] for line in text.splitlines() if line.startswith("no Flash")]
    assert reasons == ["r1", "r2", "r3"], text


def test_a_stage_that_raised_without_a_mismatch_is_an_error_not_ok() -> None:
    """A stage can raise before any module call is flagged: its error is the finding."""
    raised = {"error": "RuntimeError: boom", "mismatches": [], "calls": 1, "first_mismatch": None}
    frame = precision_frame({"stages": {"generate": {**raised, "failure": None, "advice": None}}})
    assert frame.to_dict("records") == [
        {"stage": "generate", "finding": "error", "detail": "RuntimeError: boom"}
    ]


def test_the_component_table_gives_sizes_in_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diagnose, "format_attention", lambda *_a: "")  # not what this reads
    monkeypatch.setattr(diagnose, "format_precision", lambda *_a: "")
    report = _capped_report("tiny")
    report["components"] = {"t3": {"parameters": 2**28, "bytes": 2**30, "dtypes": ["float32"]}}
    row = next(line for line in format_report(report).splitlines() if line.startswith("t3 "))
    assert row.split()[1:3] == ["268.44", "1024.0"], row  # parameters in millions, bytes in MiB


def test_policy_timings_are_in_milliseconds(monkeypatch: pytest.MonkeyPatch, tiny_tts: ChatterboxTTS) -> None:
    """Read from a measurement known in seconds (the timing itself is tested in test_optimized.py)."""
    timed = {
        "prefill_s": measurement([0.05] * FEW_REPEATS, "prefill"),
        "step_s": measurement([0.001, 0.002, 0.003, 0.004], "step"),  # median 2.5 ms, IQR 1.5 ms
    }
    monkeypatch.setattr(diagnose, "measure_policy", lambda *_a, **_k: timed)
    row = policy_frame(tiny_tts, ["float32"]).iloc[0]
    assert (row["prefill_ms"], row["prefill_iqr_ms"]) == pytest.approx((50, 0))
    assert (row["step_ms"], row["step_iqr_ms"], row["repeats"]) == pytest.approx((2.5, 1.5, 4))
