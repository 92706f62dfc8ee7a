"""The dtype census and tracer, on planted cases and on the real generate path."""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from chatterbox.tts import ChatterboxTTS
from torch import nn

from tts_workbench.core.constants import SPEECH_VOCAB_SIZE, parse_dtype
from tts_workbench.core.families import components
from tts_workbench.core.patching import shadow
from tts_workbench.core.rng import StreamRandom
from tts_workbench.instruments.dtypes import (
    Census,
    Failure,
    advice_for,
    autocast_or_refuse,
    census,
    conditionals_census,
    format_census,
    trace_dtypes,
)
from tts_workbench.models.sources import load_model
from tts_workbench.runtime.decode import text_tokens
from tts_workbench.runtime.generation import generate, prepare_voice
from tts_workbench.runtime.precision import copy_conditionals, ensure_conditionals_dtype, restored
from tts_workbench.studies.diagnose import _stage, diagnose_precision, where_half_fails


def _net() -> nn.Sequential:
    return nn.Sequential(OrderedDict(proj=nn.Linear(4, 4), act=nn.ReLU(), head=nn.Linear(4, 2)))


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _no_hooks(module: nn.Module) -> bool:
    return _hooks(module) == 0


def test_float16_linear_fed_float32_is_named_and_the_error_propagates() -> None:
    net = _net().half()
    with pytest.raises(RuntimeError, match="same dtype") as info, trace_dtypes(net) as trace:
        net(torch.randn(1, 4))
    assert trace.failure is not None and trace.failure.module == "proj"
    assert trace.failure.inputs == ["float32"] and trace.failure.weight == "float16"
    # Recorded when the call started, before it raised.
    first = trace.first_mismatch
    assert first is not None and first.module == "proj" and getattr(first, "mismatch", "") == "input/weight"
    assert any("dtype trace: proj" in n for n in info.value.__notes__)
    assert _no_hooks(net)


def test_conv_with_the_halftensor_error() -> None:
    conv = nn.Sequential(OrderedDict(conv=nn.Conv1d(2, 2, 3))).half()
    with pytest.raises(RuntimeError, match="Input type"), trace_dtypes(conv) as trace:
        conv(torch.randn(1, 2, 8))
    assert trace.failure is not None and trace.failure.module == "conv" and trace.failure.kind == "Conv1d"


def test_clean_float32_has_no_mismatch_and_hooks_are_removed() -> None:
    net = _net()
    with trace_dtypes(net) as trace:
        net(torch.randn(1, 4))
    assert trace.first_mismatch is None and trace.failure is None
    assert [r.module for r in trace.records] == ["(root)", "proj", "act", "head"]  # in call order
    assert trace.summary()["calls"] == 4 and trace.summary()["mismatches"] == []
    assert _no_hooks(net)


def test_autocast_region_is_flagged() -> None:
    net = _net()
    with trace_dtypes(net) as trace, torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(1, 4))
        net(torch.randn(1, 4).bfloat16())  # flagged again: the summary keeps each module's first
    first = trace.first_mismatch
    assert first is not None and first.module == "proj" and first.mismatch == "autocast"
    assert first.autocast == "bfloat16"
    by_module = [(m["module"], m["inputs"]) for m in trace.summary()["mismatches"]]
    assert by_module == [("proj", ["float32"]), ("head", ["bfloat16"])]


def test_silent_upcast_is_flagged() -> None:
    class Upcasts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4).half())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x @ self.w).float()  # runs, but hands float32 on

    net = nn.Sequential(OrderedDict(up=Upcasts()))
    with trace_dtypes(net) as trace:
        net(torch.randn(1, 4).half())
    assert [(r.module, r.mismatch) for r in trace.mismatches] == [("up", "upcast")]


def test_a_scripted_submodule_is_left_untraced_and_named() -> None:
    net = nn.Sequential(OrderedDict(proj=nn.Linear(4, 4), scripted=torch.jit.script(nn.Linear(4, 4))))
    with trace_dtypes(net) as trace:  # raised: register_forward_pre_hook is not supported on ScriptModules
        net(torch.ones(1, 4))
    assert [r.module for r in trace.records] == ["(root)", "proj"]
    assert trace.untraced == trace.summary()["untraced"] == ["scripted"]
    assert _no_hooks(net)


class _Unhookable(nn.Linear):
    def register_forward_hook(self, *args: object, **kwargs: object) -> Any:
        raise RuntimeError("no hooks here")


def test_hooks_registered_before_a_registration_fails_are_removed() -> None:
    net = nn.Sequential(OrderedDict(proj=nn.Linear(4, 4), odd=_Unhookable(4, 4)))
    with pytest.raises(RuntimeError, match="no hooks here") as info, trace_dtypes(net):
        pass
    assert _no_hooks(net)  # were left on proj (and odd's pre-hook) for good
    assert not getattr(info.value, "__notes__", [])  # not a failure of the traced block


def test_module_without_floating_parameters() -> None:
    emb = nn.Sequential(OrderedDict(relu=nn.ReLU()))
    with trace_dtypes(emb) as trace:
        emb(torch.randn(3))
    assert trace.records and trace.first_mismatch is None


@pytest.mark.parametrize(
    "error, named",
    # a message that starts with a blank line is named by its first words, not "RuntimeError: "
    [
        (KeyError("boom"), "KeyError: 'boom'"),
        (RuntimeError("\nshapes differ\nmore"), "RuntimeError: shapes differ"),
    ],
)
def test_module_raising_something_else_is_reported_and_reraised(error: Exception, named: str) -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise error

    net = nn.Sequential(OrderedDict(boom=Boom()))
    with pytest.raises(type(error)), trace_dtypes(net) as trace:
        net(torch.randn(2))
    assert trace.failure is not None and trace.failure.module == "boom" and trace.failure.error == named
    assert _no_hooks(net)


def test_tracing_never_changes_the_tokens(tiny_tts: ChatterboxTTS) -> None:
    plain = generate(tiny_tts, "Trace me.", max_new_tokens=15, seed=4)
    parts = (tiny_tts.t3, tiny_tts.s3gen, tiny_tts.ve)
    before = [_hooks(m) for m in parts]  # upstream's weight_norm keeps pre-hooks of its own
    with trace_dtypes(tiny_tts) as trace:
        traced = generate(tiny_tts, "Trace me.", max_new_tokens=15, seed=4)
    assert traced.speech_tokens == plain.speech_tokens
    assert trace.records and trace.first_mismatch is None
    assert [_hooks(m) for m in parts] == before


def test_census_and_conditionals(tiny_tts: ChatterboxTTS) -> None:
    found = census(tiny_tts)
    rows = {r.path: r for r in found.rows}
    assert {"ve", "t3", "s3gen", "t3.tfmr", "s3gen.mel2wav"} <= set(rows)
    assert rows["t3"].param_dtypes == {"float32": sum(p.numel() for p in tiny_tts.t3.parameters())}
    frame = found.to_frame().set_index("module")
    assert frame.at["t3", "params_float32"] == rows["t3"].param_dtypes["float32"]
    assert frame.at["t3", "size_mib"] * 2**20 == rows["t3"].bytes
    # bytes, each tensor's own size: not elements, nor 4 per element (which float32 alone would
    # not tell apart), so on a copy of the model whose T3 is float16
    half = copy.copy(tiny_tts)
    half.t3 = copy.deepcopy(tiny_tts.t3).half()
    half_t3 = next(r for r in census(half).rows if r.path == "t3")
    t3_tensors = [*half.t3.parameters(), *half.t3.buffers()]
    assert half_t3.bytes == sum(t.numel() * t.element_size() for t in t3_tensors)
    assert list(frame.columns)[-1] == "size_mib"
    buffers = {(path, f"buffers_{k}"): n for path, r in rows.items() for k, n in r.buffer_dtypes.items()}
    assert buffers and all(frame.at[path, column] == n for (path, column), n in buffers.items())
    conds = {c.name: c for c in conditionals_census(tiny_tts)}
    assert conds["conds.t3.speaker_emb"].dtype == "float32"
    assert conds["conds.t3.cond_prompt_speech_tokens"].dtype == "int64"
    assert "conds.gen.prompt_feat" in conds


def test_unknown_dtype_and_unsupported_autocast() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        parse_dtype("float8")
    with pytest.raises(ValueError, match="not supported on cpu"), autocast_or_refuse("cpu", torch.float64):
        pass


@pytest.fixture(scope="module")
def half_report(reference_wav: Path) -> dict:
    tts = load_model("tiny")
    prepare_voice(tts, str(reference_wav))
    before = {k: v.clone() for k, v in tts.t3.state_dict().items()}
    report = diagnose_precision(tts, str(reference_wav), torch.float16, tokens=8)
    # The diagnosis casts the model in place and puts it back: the caller's model is as it was.
    after = tts.t3.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert tts.conds is not None and tts.conds.t3.speaker_emb.dtype == torch.float32
    return report


def test_upstream_float16_path_fails_where_measured(half_report: dict) -> None:
    st = half_report["stages"]
    assert st["generate"]["failure"]["module"] == "t3.cond_enc.spkr_enc"
    assert "conditionals" in st["generate"]["advice"]
    assert "kaldi" in st["conditioning"]["failure"]["where"]
    assert st["s3gen"]["failure"]["module"] == "s3gen.mel2wav.m_source.l_linear"
    assert "all of HiFT (s3gen.mel2wav) in float32" in st["s3gen"]["advice"]
    # The source lines that made the failing calls, not torch's nn/modules/linear.py.
    assert st["generate"]["failure"]["where"].startswith("t3/modules/cond_enc.py:")
    assert st["s3gen"]["failure"]["where"].startswith("models/s3gen/hifigan.py:")
    # The empty float32 att_cache default of the encoder layers is no mismatch; the weightless
    # modules that widen float16 to float32 are: SinusoidalPosEmb (upstream casts it back at
    # once) and HiFT's SineGen, whose float32 sines then break l_linear.
    flagged = [(m["module"], m["mismatch"]) for m in st["s3gen"]["mismatches"]]
    assert flagged == [
        ("s3gen.flow.decoder.estimator.time_embeddings", "upcast"),
        ("s3gen.mel2wav.m_source.l_sin_gen", "upcast"),
        ("s3gen.mel2wav.m_source.l_linear", "input/weight"),
    ]


def test_where_half_fails_is_one_row_per_failing_stage_of_each_model(
    half_report: dict, reference_wav: Path
) -> None:
    found = where_half_fails({"standard": "tiny"}, str(reference_wav), torch.float16, tokens=8)
    assert list(found.columns) == ["family", "stage", "detail"] and set(found["family"]) == {"standard"}
    assert list(found["stage"]) == ["conditioning", "generate", "s3gen"]
    # the failing modules the full report names
    failures = [st["failure"] for st in half_report["stages"].values()]
    outside = "(outside a module)"  # the speaker encoder's kaldi fbank is a function
    assert list(found["detail"]) == [f"{f['module'] or outside} at {f['where']}" for f in failures]
    # and what they are, not only that the two agree (the same function made both)
    expected = ("(outside a module) at torchaudio/compliance/kaldi.py:",
                "t3.cond_enc.spkr_enc at t3/modules/cond_enc.py:",
                "s3gen.mel2wav.m_source.l_linear at models/s3gen/hifigan.py:")  # fmt: skip
    assert all(d.startswith(e) for d, e in zip(found["detail"], expected, strict=True)), list(found["detail"])


def test_the_fbank_advice_fits_a_bfloat16_failure_too(reference_wav: Path) -> None:
    # kaldi's fbank refuses bfloat16 as it does float16: before 2026-12-04 its advice said
    # "no Half fbank kernel" under "Unsupported dtype BFloat16"
    tts = load_model("tiny")
    prepare_voice(tts, str(reference_wav))
    conditioning = diagnose_precision(tts, str(reference_wav), torch.bfloat16, tokens=4)["stages"][
        "conditioning"
    ]
    assert "BFloat16" in conditioning["error"] and "kaldi" in conditioning["failure"]["where"]
    assert "Half" not in conditioning["advice"] and "bfloat16" in conditioning["advice"]


def test_float32_precision_report_is_clean(reference_wav: Path) -> None:
    tts = load_model("tiny")
    prepare_voice(tts, str(reference_wav))
    before = torch.get_rng_state()
    report = diagnose_precision(tts, str(reference_wav), torch.float32, tokens=8)
    for stage in report["stages"].values():
        assert stage["error"] is None and stage["mismatches"] == [] and stage["first_mismatch"] is None
    # its S3Gen stage's draws (HiFT's) come from a generator of its own: before 2026-12-04 they
    # moved the caller's global state, so a seeded script after a diagnosis sampled other tokens
    assert torch.equal(torch.get_rng_state(), before)


class _Half(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_failure_is_kept_when_the_user_catches_it_inside_the_block() -> None:
    model = _Half()
    with trace_dtypes(model) as t:
        try:
            model(torch.ones(2, 4))  # float32 into float16 weights: raises inside inner
        except RuntimeError:
            pass
    assert t.failure is not None and t.failure.module == "inner" and t.failure.weight == "float16"
    assert t.failure.inputs == ["float32"] and "RuntimeError" in t.failure.error
    first = t.first_mismatch
    assert first is not None and first.module == "inner" and first.inputs == ["float32"]


def test_mismatch_in_a_module_that_never_raises_is_recorded_at_call_start() -> None:
    model = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16))
    with trace_dtypes(model) as t, torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.ones(2, 4))  # autocast makes it run: no error, but the inputs were float32
    assert t.failure is None
    assert [(r.module, r.mismatch) for r in t.mismatches] == [("0", "autocast")]
    assert t.mismatches[0].outputs == ["bfloat16"]  # completed at return


def test_the_exception_that_escapes_is_the_one_named() -> None:
    first, second = _Half(), nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16))
    model = nn.ModuleDict({"first": first, "second": second})
    with pytest.raises(RuntimeError) as info, trace_dtypes(model) as t:
        try:
            first(torch.ones(2, 4))
        except RuntimeError:
            pass  # caught: recorded, but not the one that leaves the block
        second(torch.ones(2, 4))
    assert t.failure is not None and t.failure.module == "second.0" and t.failure.weight == "bfloat16"
    assert "second.0" in str(info.value.__notes__)


# Upstream's cache default (``torch.zeros((0, 0, 0, 0))`` in the signature): float32, whatever
# the model's dtype.
_EMPTY_CACHE = torch.zeros((0, 0, 0, 0))


class _Attention(nn.Module):
    """Like upstream's RelPositionMultiHeadedAttention: own weights, an empty float32 cache."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, cache: torch.Tensor = _EMPTY_CACHE) -> torch.Tensor:
        return self.q(x)


class _Layer(nn.Module):
    """Like upstream's ConformerEncoderLayer: passes its float32 default ``att_cache`` on."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attention()

    def forward(self, x: torch.Tensor, att_cache: torch.Tensor = _EMPTY_CACHE) -> torch.Tensor:
        return self.self_attn(x, att_cache)


def test_an_empty_float32_placeholder_is_not_a_mismatch() -> None:
    net = nn.Sequential(OrderedDict(layer=_Layer())).half()
    with trace_dtypes(net) as trace:
        out = net(torch.ones(1, 4).half())
    assert out.dtype == torch.float16  # runs fine: the empty cache holds no value to mismatch
    assert trace.mismatches == []
    assert [r.inputs for r in trace.records if r.module == "layer.self_attn"] == [["float16"]]


class _Sines(nn.Module):
    """Like upstream's SineGen: no weights of its own, float16 in, float32 out."""

    def forward(self, f0: torch.Tensor) -> torch.Tensor:
        return torch.sin(f0.float())


def test_a_parameter_free_upcast_is_flagged_where_it_happens() -> None:
    net = nn.Sequential(OrderedDict(sines=_Sines(), merge=nn.Linear(4, 1))).half()
    with pytest.raises(RuntimeError), trace_dtypes(net) as trace:
        net(torch.ones(2, 4).half())
    flagged = [(r.module, r.mismatch) for r in trace.mismatches]
    assert flagged == [("sines", "upcast"), ("merge", "input/weight")]
    assert trace.mismatches[0].inputs == ["float16"] and trace.mismatches[0].outputs == ["float32"]
    assert trace.failure is not None and trace.failure.module == "merge"  # where it breaks
    # The containers around it pass the float32 on: only the module that widened is flagged.
    outer = nn.Sequential(OrderedDict(source=nn.Sequential(OrderedDict(sines=_Sines()))))
    with trace_dtypes(outer) as trace:
        outer(torch.ones(2, 4).half())
    assert [(r.module, r.mismatch) for r in trace.mismatches] == [("source.sines", "upcast")]


class _Encoder(nn.Module):
    """Like upstream's VoiceEncoder: a weight of its own (``similarity_weight``) this call does not use."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _Widens(_Encoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).double()  # a change of its own, not the one its submodule made


def test_a_container_with_weights_is_flagged_only_for_a_change_of_its_own() -> None:
    with trace_dtypes(enc := _Encoder()) as trace, torch.autocast("cpu", dtype=torch.bfloat16):
        enc(torch.ones(1, 4))
    assert [(r.module, r.mismatch) for r in trace.mismatches] == [("proj", "autocast")]  # was (root) first
    with pytest.raises(RuntimeError), trace_dtypes(enc) as trace:
        enc(torch.ones(1, 4).bfloat16())  # handed on to proj: where it meets weights and raises
    assert [(r.module, r.mismatch) for r in trace.mismatches] == [("proj", "input/weight")]
    with trace_dtypes(wide := _Widens()) as trace, torch.autocast("cpu", dtype=torch.bfloat16):
        wide(torch.ones(1, 4))
    assert [(r.module, r.outputs) for r in trace.mismatches] == [
        ("(root)", ["float64"]),
        ("proj", ["bfloat16"]),
    ]


def test_parameter_free_modules_that_do_not_widen_are_not_flagged() -> None:
    class Mix(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b  # float16 + float32 -> float32: no wider than the widest input

    class Positions(nn.Module):
        def forward(self, n: torch.Tensor) -> torch.Tensor:
            return torch.arange(int(n), dtype=torch.float32)  # ints in: nothing to widen

    net = nn.ModuleDict({"mix": Mix(), "pos": Positions(), "relu": nn.ReLU()})
    with trace_dtypes(net) as trace:
        net["mix"](torch.ones(2).half(), torch.ones(2))
        net["pos"](torch.tensor(3))
        net["relu"](torch.ones(2).half())
    assert len(trace.records) == 3 and trace.mismatches == []


def test_a_parameter_free_widening_under_autocast_is_named_autocast() -> None:
    loss = nn.ModuleDict({"mse": nn.MSELoss()})
    with trace_dtypes(loss) as trace, torch.autocast("cpu", dtype=torch.bfloat16):
        loss["mse"](torch.ones(4).bfloat16(), torch.zeros(4).bfloat16())  # autocast runs it in float32
    assert [(r.module, r.mismatch, r.outputs) for r in trace.mismatches] == [("mse", "autocast", ["float32"])]


def _raises(module: nn.Module, args: tuple[object, ...]) -> None:
    raise ValueError("a pre-hook of the user's")


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.other = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            self.inner(x)
        except ValueError:
            pass  # the user's program handles its own pre-hook's error and goes on
        return self.other(x)


def test_a_raising_pre_hook_registered_before_the_tracer_keeps_the_stack_whole() -> None:
    pair = _Pair()
    pair.inner.register_forward_pre_hook(_raises)
    with trace_dtypes(pair) as trace:
        out = pair(torch.ones(1, 4))  # crashed with IndexError: pop from empty list
    assert out.shape == (1, 4)
    assert [(r.module, r.outputs) for r in trace.records] == [
        ("(root)", ["float32"]),
        ("inner", []),
        ("other", ["float32"]),
    ]
    # The tracer's pre-hook runs first, so the module the error came from is the one named.
    assert trace.failure is not None and trace.failure.module == "inner"
    assert "ValueError" in trace.failure.error
    assert _hooks(pair) == 1  # only the user's own


def test_a_raising_pre_hook_that_runs_before_the_tracers_leaves_its_entry_alone() -> None:
    pair = _Pair()
    with trace_dtypes(pair) as trace:
        pair.inner.register_forward_pre_hook(_raises, prepend=True)  # ahead of the tracer's
        out = pair(torch.ones(1, 4))
    assert out.shape == (1, 4)
    assert [(r.module, r.outputs) for r in trace.records] == [("(root)", ["float32"]), ("other", ["float32"])]


class _Source(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return self.lin(y)  # the source line that raised


def test_failure_where_is_the_source_line_outside_torch() -> None:
    net = nn.Sequential(OrderedDict(src=_Source()))
    with pytest.raises(RuntimeError), trace_dtypes(net) as trace:
        net(torch.ones(1, 4).half())
    lines = Path(__file__).read_text().splitlines()
    line = next(i for i, s in enumerate(lines, 1) if "the source line that" in s)
    assert trace.failure is not None and trace.failure.module == "src.lin"
    assert trace.failure.where.endswith(f"tests/test_dtypes.py:{line} forward")  # was nn/modules/linear.py


def test_failure_outside_any_module_keeps_the_innermost_frame_of_the_block(tiny_tts: ChatterboxTTS) -> None:
    # Raised in the workbench's own code, under the workbench's with-block: no frame outside
    # torch or the workbench, so the innermost frame is named, not contextlib's __exit__ above.
    stage = _stage(tiny_tts, partial(parse_dtype, "float8"))
    assert stage["failure"]["module"] == "" and "unknown dtype" in stage["error"]
    assert stage["failure"]["where"].startswith("tts_workbench/core/constants.py:")


def _failure(module: str, where: str = "") -> Failure:
    return Failure(module, "Linear", ["float32"], "float16", "RuntimeError: ...", where)


def test_hift_failures_get_hift_advice_not_the_mel_spectrogram_one() -> None:
    conv = advice_for(_failure("s3gen.mel2wav.conv_pre", "models/s3gen/hifigan.py:470 decode"))
    assert conv is not None and "HiFT" in conv and "mel spectrograms" not in conv
    source = advice_for(_failure("s3gen.mel2wav.m_source.l_linear", "models/s3gen/hifigan.py:280 forward"))
    assert source is not None and "sine source" in source  # the more precise entries still win
    assert "all of HiFT" in source and "cast the mel" in source  # the source alone is no fix
    mel = advice_for(_failure("", "models/s3gen/utils/mel.py:70 mel_spectrogram"))
    assert mel is not None and "mel spectrograms" in mel


def test_the_voice_encoder_under_bfloat16_autocast_fails_at_numpy(tiny_tts: ChatterboxTTS) -> None:
    wav = np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32)
    with (
        pytest.raises(TypeError, match="BFloat16"),
        trace_dtypes(tiny_tts) as trace,
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        tiny_tts.ve.embeds_from_wavs([wav], sample_rate=16000)
    # Not the LSTM: it ran, on float32 inputs and weights; upstream's .numpy() of its bfloat16 output raised.
    lstm = [r for r in trace.records if r.module == "ve.lstm"]
    assert lstm and lstm[0].inputs[0] == "float32" and lstm[0].weight == "float32"
    # Autocast's bfloat16 comes out of the LSTM; the VoiceEncoder around it only hands it on.
    first = trace.first_mismatch
    assert first is not None and first.module == "ve.lstm"  # was "ve"
    assert trace.failure is not None and trace.failure.module == ""
    assert "voice_encoder.py" in trace.failure.where and "embeds_from_mels" in trace.failure.where
    text = advice_for(trace.failure)
    assert text is not None and ".numpy()" in text and "autocast" in text and "LSTM weights" not in text


class _Doubles(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2  # no weights: compared with its inputs only


def test_threads_calling_one_model_at_once_each_get_their_own_calls() -> None:
    # One stack for all threads paired a float16 call's end with a float32 call's start:
    # false "upcast" flags, and outputs left on records whose end another thread took.
    net = nn.Sequential(*(_Doubles() for _ in range(8)))
    start = threading.Barrier(2)

    def run(dtype: torch.dtype) -> None:
        start.wait()
        for _ in range(300):
            net(torch.ones(4, dtype=dtype))

    with trace_dtypes(net) as trace:
        threads = [threading.Thread(target=run, args=(d,)) for d in (torch.float16, torch.float32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(trace.records) == 2 * 300 * 9 and trace.mismatches == []
    assert all(r.outputs == r.inputs for r in trace.records)


def test_a_module_called_in_the_callers_except_block_raised_only_if_it_did() -> None:
    class Silent(nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            return None  # returns nothing: not a raise, whatever the caller is handling

    net = nn.ModuleDict({"silent": Silent(), "narrow": nn.Linear(4, 4).half()})
    with trace_dtypes(net) as trace:
        try:
            raise KeyError("the caller's own, handled")
        except KeyError:
            net["silent"](torch.ones(4))
    assert trace.failure is None and [r.module for r in trace.records] == ["silent"]
    with trace_dtypes(net) as trace:
        try:
            raise KeyError("the caller's own, handled")
        except KeyError:
            with pytest.raises(RuntimeError):
                net["narrow"](torch.ones(4))  # raises while the caller handles another
    assert trace.failure is not None and trace.failure.module == "narrow"
    assert "RuntimeError" in trace.failure.error


def test_an_empty_census_is_an_empty_table() -> None:
    frame = Census([]).to_frame()  # was a KeyError: no row, so no "module" column
    assert frame.empty and list(frame.columns) == ["module", "size_mib"]
    assert "no rows" in format_census(Census([]))


def test_two_threads_failing_at_once_both_name_the_module_that_raised() -> None:
    # One remembered exception for all threads: thread A's, replaced by B's, was taken for a new
    # one at A's outer module, and trace.failure named that container instead of the Linear.
    inner_failed, b_failed = threading.Event(), threading.Event()

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2).half()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if threading.current_thread().name == "B":
                inner_failed.wait(5)  # B fails after A's failure was recorded
            else:
                inner_failed.set()
            return self.lin(x)  # float32 into float16 weights: raises

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            try:
                return self.inner(x)
            finally:  # A's exception reaches the outer module after B's failure
                b_failed.wait(5) if threading.current_thread().name == "A" else b_failed.set()

    model, failed = Outer(), []

    def run() -> None:
        with pytest.raises(RuntimeError):
            model(torch.ones(1, 2))
        failed.append(threading.current_thread().name)

    with trace_dtypes(model) as trace:
        threads = [threading.Thread(target=run, name=name) for name in "AB"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(failed) == ["A", "B"]
    assert trace.failure is not None and trace.failure.module == "inner.lin", trace.failure


@pytest.mark.parametrize("wrapped", [True, False])
def test_an_error_raised_anew_from_a_modules_keeps_that_module(wrapped: bool) -> None:
    # a caller that wraps the model's error (raise ... from e): before 2026-12-04 the trace then
    # named no module ("(no module running)") where the failing call was recorded. One raised while
    # handling it, without ``from``, has it as its ``__context__`` only: no test raised one so.
    net = nn.Sequential(OrderedDict(proj=nn.Linear(4, 4), head=nn.Linear(4, 2))).half()
    with pytest.raises(ValueError, match="model failed") as info, trace_dtypes(net) as trace:
        try:
            net(torch.randn(1, 4))
        except RuntimeError as e:
            if wrapped:
                raise ValueError("model failed") from e
            raise ValueError("model failed")  # noqa: B904 - the implicit chain is the case tested
    assert trace.failure is not None and trace.failure.module == "proj", trace.failure
    assert "proj" in info.value.__notes__[0]


def test_the_note_names_the_module_the_escaping_error_came_from() -> None:
    # a kept error raised after another failure: the note named the last failure recorded (b)
    net = nn.ModuleDict({"a": nn.Linear(4, 4).half(), "b": nn.Linear(4, 4).half()})
    with pytest.raises(RuntimeError) as info, trace_dtypes(net) as trace:
        try:
            net["a"](torch.ones(4))  # float32 into float16 weights: kept, raised below
        except RuntimeError as e:
            err = e
        try:
            net["b"](torch.ones(4))
        except RuntimeError:
            pass
        raise err
    note = info.value.__notes__[0]
    assert "a (Linear)" in note and "b (Linear)" not in note, note
    assert trace.failure is not None and trace.failure.module == "b"  # still the last failure


def test_calls_inside_compiled_code_are_traced_and_the_trace_says_they_ran_eagerly() -> None:
    # Dynamo ignores module hooks added after compiling: the compiled call recorded its root only
    # (its hooks run outside the graph), with nothing on the trace to say the rest was missed.
    net = nn.Sequential(OrderedDict(a=nn.Linear(4, 4), b=nn.Linear(4, 4)))
    compiled = torch.compile(net, backend="eager")
    compiled(torch.randn(2, 4))
    with trace_dtypes(net) as trace:
        compiled(torch.randn(2, 4))
    assert [r.module for r in trace.records] == ["(root)", "a", "b"]
    assert trace.forced_eager and trace.summary()["forced_eager"] is True
    with trace_dtypes(net) as plain:
        net(torch.randn(2, 4))
    assert [r.module for r in plain.records] == ["(root)", "a", "b"] and not plain.forced_eager
    assert _no_hooks(net)


def test_the_callers_compile_stance_comes_back_after_the_block_also_on_error() -> None:
    net = nn.Sequential(OrderedDict(a=nn.Linear(4, 4)))
    compiled = torch.compile(net, backend="eager", dynamic=False)
    compiled(torch.randn(1, 4))
    with torch.compiler.set_stance("fail_on_recompile"):
        with pytest.raises(KeyError), trace_dtypes(net) as trace:
            compiled(torch.randn(2, 4))  # a new shape: run eagerly, not recompiled (nor refused)
            raise KeyError("the block's own")
        assert [r.module for r in trace.records] == ["(root)", "a"]
        with pytest.raises(RuntimeError, match="Detected recompile"):  # the caller's stance again
            compiled(torch.randn(3, 4))
    # Blocks that overlap (from two threads) leave compiled code eager until the last one ends.
    first, second = trace_dtypes(net), trace_dtypes(net)
    first.__enter__()
    late = second.__enter__()
    first.__exit__(None, None, None)
    compiled(torch.randn(4, 4))
    second.__exit__(None, None, None)
    assert [r.module for r in late.records] == ["(root)", "a"] and late.forced_eager


def test_a_module_shared_by_two_parents_is_recorded_under_the_caller_that_called_it() -> None:
    # named_modules lists a shared module once: one hook, and every call named by its first path
    # (S3Gen's conformer shares one SiLU between encoders.0 and up_encoders.0-3).
    class Uses(nn.Module):
        def __init__(self, act: nn.Module) -> None:
            super().__init__()
            self.act = act

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x)

    act = nn.SiLU()
    net = nn.Sequential(OrderedDict(a=Uses(act), b=Uses(act)))
    net.b.again = act  # twice under one parent: named by its first name there
    with trace_dtypes(net) as trace:
        net(torch.ones(4))
    assert [r.module for r in trace.records] == ["(root)", "a", "a.act", "b", "b.act"]
    with trace_dtypes(net) as trace:
        act(torch.ones(4))  # called outside any traced call: its first path
    assert [r.module for r in trace.records] == ["a.act"]


def test_the_istft_advice_names_bfloat16_not_half_precision() -> None:
    # torch.complex takes float16 on CPU (complex32) and refuses only bfloat16: before 2026-12-05
    # the advice said it had "no half-precision CPU kernel"
    text = advice_for(_failure("", "models/s3gen/hifigan.py:408 _istft"))
    assert text is not None and "bfloat16" in text and "half-precision" not in text


def test_the_fbank_advice_says_to_cast_the_encoders_input_too() -> None:
    # upstream casts the 16 kHz wav to S3Gen's dtype before CAMPPlus (s3gen.py:152): a float32
    # encoder alone still hands its fbank float16 (before 2026-12-05 the advice said only that)
    fbank = _failure("", "torchaudio/compliance/kaldi.py:616 fbank")
    tdnn = _failure("s3gen.speaker_encoder.xvector.tdnn.linear", "models/s3gen/xvector.py:420 forward")
    for failure in (fbank, tdnn):
        text = advice_for(failure)
        assert text is not None and "cast the wav" in text and "runtime.precision" in text, text


def test_following_the_fbank_advice_gets_a_float16_model_past_the_fbank(
    tiny_tts: ChatterboxTTS, reference_wav: Path
) -> None:
    """Both parts of the advice are needed: the float32 encoder alone still fails in the fbank."""
    encoder = tiny_tts.s3gen.speaker_encoder

    def float32_input(fn: Any) -> Any:
        return lambda wav, *a, **k: fn(wav.float(), *a, **k)

    def failure_where() -> str:
        with pytest.raises((RuntimeError, ValueError)), trace_dtypes(tiny_tts) as trace:
            prepare_voice(tiny_tts, str(reference_wav))
        assert trace.failure is not None
        return trace.failure.where

    with restored(tiny_tts):
        for module in components(tiny_tts).values():
            module.to(torch.float16)
        encoder.float()
        assert "kaldi" in failure_where()
        with shadow(encoder, "inference", float32_input):
            assert "kaldi" not in failure_where()


def test_following_the_hift_advice_gets_a_float16_s3gen_through_inference(tiny_tts: ChatterboxTTS) -> None:
    """A float32 sine source alone hands its float32 sines on to HiFT's float16 convolutions: before
    2026-12-06 the advice said only that. All of HiFT in float32, fed a float32 mel, runs."""
    hift = tiny_tts.s3gen.mel2wav
    tokens = torch.randint(0, SPEECH_VOCAB_SIZE, (1, 10), generator=torch.Generator().manual_seed(0))
    assert tiny_tts.conds is not None
    gen = dict(tiny_tts.conds.gen)

    def vocode() -> torch.Tensor:
        with StreamRandom(0).drawing():
            return tiny_tts.s3gen.inference(speech_tokens=tokens, ref_dict=gen)[0]

    def failure() -> Failure:
        with pytest.raises(RuntimeError), trace_dtypes(tiny_tts) as trace:
            vocode()
        assert trace.failure is not None
        return trace.failure

    def float32_mel(fn: Any) -> Any:
        return lambda speech_feat, **k: fn(speech_feat=speech_feat.float(), **k)

    with restored(tiny_tts):
        tiny_tts.s3gen.to(torch.float16)
        first = failure()
        advice = advice_for(first)
        assert first.module == "s3gen.mel2wav.m_source.l_linear"
        assert advice is not None and "s3gen.mel2wav" in advice and "cast the mel" in advice, advice
        hift.m_source.float()  # what the advice said before
        assert failure().module == "s3gen.mel2wav.source_downs.0"
        hift.float()  # what it says now: all of HiFT, and the mel it gets
        with shadow(hift, "inference", float32_mel):
            wav = vocode()
    assert wav.dtype == torch.float32 and wav.numel() > 0 and torch.isfinite(wav).all()


def test_following_the_conditionals_advice_gets_a_float16_t3_past_its_cond_enc(reference_wav: Path) -> None:
    """The float32 generation a diagnosis runs first leaves a float32 prompt embedding cached on the
    conditionals: before 2026-12-06 the advice named only speaker_emb and emotion_adv, and T3 cast
    to float16 with those two cast still failed in its perceiver."""
    tts = load_model("tiny")
    prepare_voice(tts, str(reference_wav))
    generate(tts, "Hi.", max_new_tokens=2, seed=0)  # as the diagnosis's float32 run
    assert tts.conds is not None and tts.conds.t3.cond_prompt_speech_emb is not None
    advice = advice_for(_failure("t3.cond_enc.spkr_enc", "t3/modules/cond_enc.py:70 forward"))
    assert advice is not None and "cond_prompt_speech_emb" in advice, advice
    assert "ensure_conditionals_dtype" in advice
    ids = text_tokens(tts, "Hi.")

    def failing_module(cond: Any) -> str | None:
        with trace_dtypes(tts.t3) as trace, StreamRandom(0).drawing():
            try:
                tts.t3.inference(t3_cond=cond, text_tokens=ids, max_new_tokens=2)
            except RuntimeError:
                pass  # named by the trace
        return trace.failure.module if trace.failure else None

    tts.t3.to(torch.float16)
    by_hand = copy_conditionals(tts.conds)
    assert by_hand is not None
    cond = by_hand.t3
    cond.speaker_emb, cond.emotion_adv = cond.speaker_emb.half(), cond.emotion_adv.half()
    assert failing_module(cond) == "cond_enc.perceiver.attn.norm"  # the two alone
    cond.cond_prompt_speech_emb = None  # and the third
    assert failing_module(cond) is None
    ensured = copy_conditionals(tts.conds)
    assert ensured is not None
    ensured = ensure_conditionals_dtype(ensured, torch.float16, torch.float32, tts.device)  # or all three
    assert failing_module(ensured.t3) is None
