"""The dtype census and tracer, on planted cases and on the real generate path."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from chatterbox.tts import ChatterboxTTS
from torch import nn

from tts_workbench.core.constants import parse_dtype
from tts_workbench.instruments.dtypes import autocast_or_refuse, census, conditionals_census, trace_dtypes
from tts_workbench.models.sources import load_model
from tts_workbench.runtime.generation import generate, prepare_voice
from tts_workbench.studies.diagnose import diagnose_precision


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
    assert _no_hooks(net)


def test_autocast_region_is_flagged() -> None:
    net = _net()
    with trace_dtypes(net) as trace, torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(1, 4))
    first = trace.first_mismatch
    assert first is not None and first.module == "proj" and first.mismatch == "autocast"


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


def test_module_without_floating_parameters() -> None:
    emb = nn.Sequential(OrderedDict(relu=nn.ReLU()))
    with trace_dtypes(emb) as trace:
        emb(torch.randn(3))
    assert trace.records and trace.first_mismatch is None


def test_module_raising_something_else_is_reported_and_reraised() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise KeyError("boom")

    net = nn.Sequential(OrderedDict(boom=Boom()))
    with pytest.raises(KeyError), trace_dtypes(net) as trace:
        net(torch.randn(2))
    assert trace.failure is not None and trace.failure.module == "boom"
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
    assert list(frame.columns)[-1] == "size_mib" and (frame.filter(like="buffers_") >= 0).all().all()
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
    # The diagnosis casts a copy: the caller's model is as it was.
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
    assert "sine source" in st["s3gen"]["advice"]


def test_float32_precision_report_is_clean(reference_wav: Path) -> None:
    tts = load_model("tiny")
    prepare_voice(tts, str(reference_wav))
    report = diagnose_precision(tts, str(reference_wav), torch.float32, tokens=8)
    for stage in report["stages"].values():
        assert stage["error"] is None and stage["mismatches"] == [] and stage["first_mismatch"] is None


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
