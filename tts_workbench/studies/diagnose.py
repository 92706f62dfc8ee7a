"""The end-to-end diagnosis behind ``tts-workbench diagnose`` and ``make demo``."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pandas as pd
import soundfile as sf
import torch
from chatterbox.models.t3 import T3
from chatterbox.tts import ChatterboxTTS, Conditionals

from ..core.clock import FEW_REPEATS, now
from ..core.constants import SPEECH_VOCAB_SIZE, UPSTREAM_SENTENCE, dtype_name
from ..core.devices import check_device
from ..core.errors import (
    PREPARE_FIRST,
    CacheError,
    ConfigError,
    NoVoiceError,
    SourceError,
    error_line,
    naming_flag,
)
from ..core.families import components
from ..core.files import written
from ..core.patching import capture_hooks_undone
from ..core.positions import positions_needed, tokens_that_fit
from ..core.progress import Stages
from ..core.rng import StreamRandom
from ..core.tables import render
from ..instruments import plots
from ..instruments.attention import (
    configured_backend,
    eager_instead,
    probe_backends,
    probe_output_attentions,
    record_kernels,
    why_not_flash,
)
from ..instruments.dtypes import (
    DtypeTrace,
    advice_for,
    autocast_or_refuse,
    census,
    conditionals_census,
    trace_dtypes,
)
from ..models.reference import generated_voice, reference_line
from ..models.sources import load_model, model_summary, token_cap_note
from ..runtime.decode import (
    DecodePlan,
    gpt2_positions,
    prefill_length,
    spoken_language,
    t3_decode,
    text_tokens,
)
from ..runtime.generation import generate, prepare_voice
from ..runtime.optimized import check_decode, measure_policy
from ..runtime.precision import restored

# run_diagnosis's stages: the model, the voice, the generation, the decode step, the files, the
# attention probes, then diagnose_precision's three
DIAGNOSIS_STAGES = 9


def run_diagnosis(
    model: str = "tiny",
    text: str = UPSTREAM_SENTENCE,
    reference: str | None = None,
    tokens: int = 150,
    seed: int = 0,
    device: str = "cpu",
    outdir: str | Path = "runs/diagnose",
    dtype: torch.dtype = torch.float32,
    autocast: torch.dtype | None = None,
    decode: str = "eager",
    family: str | None = None,
    progress: bool = False,
    language_id: str | None = None,
) -> dict[str, Any]:
    """Build or load ``model`` (``family``: of a folder holding two, as ``load_model`` takes it),
    condition it on a voice, generate once in float32 (recording attention kernels), name the
    kernel of T3's ``decode`` step (eager, static or compiled: the path the user runs), probe the
    attention backend, then run the ``dtype``/``autocast`` precision diagnosis. Writes
    ``speech.wav`` and ``generation.png`` under ``outdir``. ``progress``: each stage named on a
    bar on stderr as it runs (``Stages``; the command line's).
    """
    check_device(device)  # before the clock reads it
    outdir = Path(outdir)
    with Stages("diagnose", DIAGNOSIS_STAGES, progress) as stage:
        stage("building the model")
        t0 = now(device)
        with naming_flag("--model", SourceError):  # a folder unreadable or unfit: named as stream names it
            tts = load_model(model, device=device, seed=seed, family=family)
        build_s = now(device) - t0
        stage("preparing the voice")
        with naming_flag("--language", ConfigError):  # a language this model does not speak here
            language_id = spoken_language(tts, language_id)
        with naming_flag("--text", ConfigError):  # a text past T3's positions, before anything is written
            text_tokens(tts, text, 0.0, language_id)
        given = reference is not None  # the user's: refused (as --reference) before the folder is made
        made = outdir / "reference.wav"  # else a generated voice, kept there once the run is known to fit
        with nullcontext(Path(reference or made)) if given else generated_voice(made, seed=seed) as voice:
            t0 = now(device)
            with naming_flag("--reference", SourceError) if given else nullcontext():
                ref = replace(prepare_voice(tts, str(voice)), path=str(reference or made))
            conditioning_s = now(device) - t0
            # Sized (or refused) before the generation: before 2026-12-04 a text too long for the
            # default static cache was refused after the whole float32 run, naming plan.max_cache_len.
            step_plan = decode_step_plan(tts, text, decode, tokens, language_id)
        outdir.mkdir(parents=True, exist_ok=True)
        stage("generating in float32")
        with record_kernels(tts) as kernels:
            result = generate(tts, text, max_new_tokens=tokens, seed=seed, language_id=language_id)
        stage(f"finding the {step_plan.step} step's kernels")
        decode_step = decode_step_kernels(
            tts, text, decode, seed, tokens, plan=step_plan, language_id=language_id
        )
        stage("writing the audio and figure")
        wav, sr = result.wav, result.sample_rate
        wav_path = written(outdir / "speech.wav", lambda path: sf.write(str(path), wav, sr))
        # a folder by its name: a whole snapshot path ran off the figure
        title = f"{Path(model).name or model}: {len(result.speech_tokens)} tokens"
        figure = plots.generation_figure(wav, sr, result.seconds, title)
        plot_path = plots.save(figure, outdir / "generation.png")
        stage("probing attention")
        # asked for the step that ran, with its recorded kernels (a Multilingual model's eager step
        # runs eager attention, its backbone's configuration put back afterwards)
        attention = diagnose_attention(tts, decode_step["step"], decode_step["kernels"])
        precision = diagnose_precision(
            tts, ref.path, dtype, autocast, min(tokens, 20), seed, text, stage, language_id
        )
    return {
        "model": model,
        "device": device,
        "torch": torch.__version__,
        "components": model_summary(tts),
        "reference": asdict(ref),
        "text": text,
        "language": language_id,  # a multilingual model's; None for the English-only families
        "speech_tokens": len(result.speech_tokens),
        "invalid_speech_tokens": result.invalid_tokens,
        "stopped_by": result.stopped_by,
        "token_cap": tokens,
        "audio_s": round(result.audio_s, 3),
        "build_s": round(build_s, 3),
        "conditioning_s": round(conditioning_s, 3),
        "generation_s": round(result.wall_s, 3),
        "phase_s": {k: round(v, 4) for k, v in result.seconds.items()},
        "rtf": round(result.rtf, 3),
        "timing": "profiled: the kernel recorder ran around this generation (bench times without it)",
        "wav": str(wav_path),
        "plot": str(plot_path),
        **kernels.summary(),  # kernels, time_share_ms
        "decode_step": decode_step,
        "attention": attention,
        "precision": precision,
    }


def phase_line(seconds: dict[str, float]) -> str:
    """Each phase's seconds, a phase's parts in brackets after it: ``t3 0.61 s (prefill 0.01 s,
    decode 0.59 s)``, so the figures listed side by side add up (before 2026-12-07 t3's parts were
    listed beside it, counted twice)."""
    parts: dict[str, list[str]] = {}
    for name, s in seconds.items():
        parent, _, part = name.rpartition(".")
        if parent in seconds:
            parts.setdefault(parent, []).append(f"{part} {s:.2f} s")
    return ", ".join(
        f"{name} {s:.2f} s" + (f" ({', '.join(parts[name])})" if name in parts else "")
        for name, s in seconds.items()
        if name.rpartition(".")[0] not in seconds
    )


def format_report(report: dict[str, Any]) -> str:
    """Human-readable text for a ``run_diagnosis`` report."""
    components = pd.DataFrame(
        {
            "component": name,
            "params_m": comp["parameters"] / 1e6,
            "size_mib": comp["bytes"] / 2**20,
            "dtypes": ", ".join(comp["dtypes"]),
        }
        for name, comp in report["components"].items()
    )
    lines = [
        f"model source : {report['model']} on {report['device']} (torch {report['torch']})",
        render(components, {"size_mib": ".1f"}),
    ]
    lines.append(f"reference    : {reference_line(report['reference'])}")
    if report.get("language"):  # a multilingual model's (absent from reports before 2026-12-07)
        lines.append(f"language     : {report['language']}")
    ended = f"ended by the {report['stopped_by']}"
    if report["stopped_by"] == "token cap":
        ended += f" of {report['token_cap']}: {token_cap_note(report['model'])}"
    lines.append(f"speech tokens: {report['speech_tokens']} ({ended})")
    if report["invalid_speech_tokens"]:
        lines.append(
            f"{'':15}{report['invalid_speech_tokens']} ids >= {SPEECH_VOCAB_SIZE} dropped before S3Gen, "
            "as upstream does"
        )
    phases = phase_line(report["phase_s"])
    lines.append(f"audio        : {report['audio_s']:.2f} s")
    # The kernel recorder's profiler ran around this generation: `bench` times it without one.
    lines.append(f"wall time    : {report['generation_s']:.2f} s, profiled ({phases})")
    lines.append(
        f"RTF          : {report['rtf']:.2f}, profiled (compute seconds per audio second; < 1 is real "
        "time; the profiler slows it: `tts-workbench bench` for timings)"
    )
    lines.append(f"build        : {report['build_s']:.2f} s, conditioning {report['conditioning_s']:.2f} s")
    lines.append(f"wrote        : {report['wav']}, {report['plot']}")
    step = report["decode_step"]
    lines.append(f"decode step  : {step['step']}: {', '.join(step['kernels'])} (found by {step['found_by']})")
    lines += ["", format_attention(report, report["attention"])]
    lines += ["", format_precision(report["precision"])]
    return "\n".join(lines)


def step_tokens(tokens: int) -> int:
    """How many of the caller's ``tokens`` the decode-step check decodes: at least 2 (the first
    comes from the prefill) and at most 20 (one decode step is enough to see its kernel)."""
    return min(max(tokens, 2), 20)


def decode_step_plan(
    tts: ChatterboxTTS, text: str, step: str, tokens: int = 20, language_id: str | None = None
) -> DecodePlan:
    """The plan ``decode_step_kernels`` runs ``step`` with for ``text`` (multilingual: in
    ``language_id``) and ``tokens``: a static
    or compiled step gets a cache that holds the run (the default one where that does, as the
    bench sizes its own); a run past the positions of a GPT-2 backbone (Turbo's), which no step
    can decode, is refused naming ``--text``. ``tts`` must have a prepared voice."""
    if tts.conds is None:
        raise NoVoiceError("prepare a voice before checking the decode step", fix=PREPARE_FIRST)
    plan = DecodePlan.plain(tts.t3, step=check_decode(step, torch.device(tts.device)))
    tokens = step_tokens(tokens)
    prefill = prefill_length(tts, text, language_id=language_id)
    need = positions_needed(prefill, tokens)
    positions = gpt2_positions(plan.decode.tfmr.config)
    if positions is not None and need > positions:
        # --tokens helps only down to the check's 2 tokens; below them the text must be shorter
        fewer = tokens_that_fit(prefill, positions)
        raise CacheError(
            f"argument --text: the decode-step check needs {need} positions ({prefill} of prefill, then "
            f"one for each of its {tokens} tokens but the last) but T3's GPT-2 backbone has {positions} "
            f"positions: shorten --text" + (f" or give --tokens {fewer}" if fewer >= 2 else "")
        )
    if plan.step != "eager":  # (the eager step's cache grows as it goes)
        plan.max_cache_len = max(plan.max_cache_len, need)
    return plan


def decode_step_kernels(
    tts: ChatterboxTTS,
    text: str,
    step: str,
    seed: int = 0,
    tokens: int = 20,
    plan: DecodePlan | None = None,
    language_id: str | None = None,
) -> dict[str, Any]:
    """The attention kernels T3's decode steps run with ``step`` ("eager", "static" or
    "compiled") and how they were found: the profiler's op records for the eager and static
    steps; Inductor's generated code for the compiled one (the profiler cannot see inside a
    compiled graph, and its phase hooks would make the step recompile). A compiled step whose
    compile failed runs static: its kernels are recorded as the static step's, after a first run,
    and ``found_by`` gives the failure's reason. ``step_tokens(tokens)``
    are decoded, with ``plan`` (``decode_step_plan(tts, text, step, tokens)``, made here when
    None; given, its step is the one checked)."""
    plan = plan or decode_step_plan(tts, text, step, tokens, language_id)
    step, tokens = plan.step, step_tokens(tokens)
    assert tts.conds is not None  # decode_step_plan checked it
    text_ids = text_tokens(tts, text, language_id=language_id)

    def run() -> None:
        rng = StreamRandom(seed).generator(tts.device)
        t3_decode(tts.t3, tts.conds.t3, text_ids, max_new_tokens=tokens, plan=plan, generator=rng)

    found_by = "torch.profiler op records"
    if step == "compiled":
        run()  # compiles outside the profiler
        compiled = plan.static_step(text_ids.size(0))
        assert compiled is not None
        if compiled.fallback_reason is None:
            return {
                "step": step,
                "kernels": compiled.attention_kernels,
                "found_by": "Inductor's generated code",
            }
        # The static step runs eagerly now: the profiler sees its kernels (before 2026-12-05 the
        # report said "(compile failed: the static step ran)", found by Inductor's code, read nothing).
        step, found_by = compiled.mode, f"{found_by} (compile failed: {compiled.fallback_reason})"
    with record_kernels(tts) as record:
        run()
    return {"step": step, "kernels": sorted(record.kernels("t3.decode")), "found_by": found_by}


def _stage(
    tts: ChatterboxTTS, fn: Callable[[], Any], kernels: bool = False, autocast: torch.dtype | None = None
) -> dict[str, Any]:
    """Run ``fn`` under the dtype tracer (and the kernel recorder); never raise. ``autocast``: the
    autocast dtype ``fn`` runs under (None: none), which the advice takes into account."""
    out: dict[str, Any] = {"error": None}
    t0 = now(tts.device)
    rec, trace = None, DtypeTrace()  # empty, if the tracer itself could not start
    try:  # outside the tracer, so the tracer sees the exception and names the failing module
        with ExitStack() as stack:
            trace = stack.enter_context(trace_dtypes(tts))
            rec = stack.enter_context(record_kernels(tts)) if kernels else None
            fn()
    except Exception as e:  # reported with its module path and advice, not swallowed silently
        out["error"] = error_line(e)
    out["seconds"] = round(now(tts.device) - t0, 3)
    out.update(trace.summary())
    first = trace.first_mismatch
    out["first_mismatch"] = vars(first) if first else None
    # Under autocast a module's outputs leave its weights' dtype by design: only a raise (the
    # block's, recorded as the failure) or a mismatch of another kind has something to fix.
    fixable = next((r for r in trace.mismatches if r.mismatch != "autocast"), None)
    out["advice"] = advice_for(trace.failure or fixable, autocast)
    if rec is not None:
        out.update(rec.summary())
    return out


def diagnose_precision(
    tts: ChatterboxTTS,
    reference: str,
    dtype: torch.dtype = torch.float32,
    autocast: torch.dtype | None = None,
    tokens: int = 20,
    seed: int = 0,
    text: str = UPSTREAM_SENTENCE,
    stage: Callable[[str], None] = lambda _name: None,
    language_id: str | None = None,
) -> dict[str, Any]:
    """The seed's half-precision failure, reproduced on purpose and traced; the caller's model
    is given back as it was (weights, dtypes, conditionals, T3's hooks and upstream backend).
    ``stage`` is told each stage's name as it starts (``run_diagnosis``'s ``Stages``).

    ``tts`` must already be conditioned in float32. Its components are then cast to ``dtype``
    the way users do (``.to(torch.float16)``) while the conditionals stay float32, and three
    stages run under the tracer: conditioning on ``reference`` again, one capped generation,
    and S3Gen alone on valid tokens (so its own failure shows even when T3 fails first).
    """
    if tts.conds is None:
        raise NoVoiceError("condition the model in float32 before diagnose_precision", fix=PREPARE_FIRST)
    # The generate stage runs upstream's T3.inference: it asks the backbone for attentions, which
    # transformers answers by hooking it for good, and keeps a new backend on T3 (before
    # 2026-12-06 both stayed on the caller's model).
    with restored(tts) as conds, capture_hooks_undone(tts.t3.tfmr), _upstream_backend_undone(tts.t3):
        return _precision_stages(
            tts, conds, reference, dtype, autocast, tokens, seed, text, stage, language_id
        )


@contextmanager
def _upstream_backend_undone(t3: T3) -> Iterator[None]:
    """``t3``'s upstream backend as it was on entry: every ``T3.inference`` makes a new
    ``patched_model`` (a submodule over T3's own backbone and heads, whose weights then show in
    ``t3.state_dict()`` a second time) and sets ``compiled``. One made inside is dropped, one
    there before is put back."""
    before, compiled = getattr(t3, "patched_model", None), getattr(t3, "compiled", False)
    try:
        yield
    finally:
        t3.compiled = compiled
        if before is not None:
            t3.patched_model = before
        elif hasattr(t3, "patched_model"):
            del t3.patched_model


def _precision_stages(
    tts: ChatterboxTTS,
    conds: Conditionals,
    reference: str,
    dtype: torch.dtype,
    autocast: torch.dtype | None,
    tokens: int,
    seed: int,
    text: str,
    stage: Callable[[str], None],
    language_id: str | None,
) -> dict[str, Any]:
    for module in components(tts).values():
        module.to(dtype)
    device = str(tts.device)
    stages: dict[str, Any] = {}
    with autocast_or_refuse(device, autocast):
        stage(f"precision: {dtype_name(dtype)} conditioning")
        stages["conditioning"] = _stage(tts, lambda: prepare_voice(tts, reference), autocast=autocast)
        tts.conds = conds  # keep the float32 conditionals of the seed scenario
        stage(f"precision: {dtype_name(dtype)} generation")
        stages["generate"] = _stage(
            tts,
            lambda: generate(tts, text, max_new_tokens=tokens, seed=seed, language_id=language_id),
            True,
            autocast,
        )
        tts.conds = conds
        valid = torch.randint(
            0, SPEECH_VOCAB_SIZE, (1, tokens), generator=torch.Generator().manual_seed(seed)
        )
        # HiFT draws its sine phases and noise: from a generator of its own, not the caller's
        # global state (before 2026-12-04 a diagnosis moved it, so a seeded user script after
        # it sampled other tokens).
        stage(f"precision: {dtype_name(dtype)} S3Gen")
        with StreamRandom(seed).drawing():
            stages["s3gen"] = _stage(
                tts,
                lambda: tts.s3gen.inference(speech_tokens=valid.to(device), ref_dict=dict(conds.gen)),
                autocast=autocast,
            )
    return {
        "dtype": dtype_name(dtype),
        "autocast": dtype_name(autocast) if autocast else None,
        "census": [vars(r) for r in census(tts).rows],
        "conditionals": [vars(r) for r in conditionals_census(tts)],
        "stages": stages,
    }


def diagnose_attention(
    tts: ChatterboxTTS, step: str = "eager", kernels: Sequence[str] | None = None
) -> dict[str, Any]:
    """Configured vs effective backend, the output_attentions probe, why not Flash, forced
    backends, for T3's decode ``step`` ("eager", "static" or "compiled") on the current device
    and dtype; ``kernels``: the step's recorded attention kernels, where known (preferred to the
    configuration). The static and compiled steps pass an attention mask (before 2026-12-04
    ``diagnose --decode static`` asked without it, and on CUDA could answer that Flash can run);
    a Multilingual model's eager step runs eager attention (before 2026-12-05 the report read the
    configuration the alignment analyzer puts back, and said sdpa)."""
    configured = configured_backend(tts)
    instead = eager_instead(tts, step, kernels)
    return {
        "configured": configured,
        "backend": f"{configured} ({instead})" if instead else configured,  # what the step runs
        "output_attentions": vars(probe_output_attentions(tts, step=step)),
        "why_not_flash": why_not_flash(tts, step=step, kernels=kernels),
        "forced_backends": [vars(p) for p in probe_backends(tts, step=step)],
    }


def format_attention(record: dict[str, Any], att: dict[str, Any]) -> str:
    """Kernels per phase with attention's share of op time, then the backend probes.

    ``record`` holds ``kernels`` and ``time_share_ms`` as ``KernelRecord.summary()`` gives them.
    """
    share = pd.DataFrame.from_dict(record["time_share_ms"], orient="index")
    pct = share.div(share.sum(axis=1), axis=0).mul(100).reindex(columns=["attention", "linear/matmul"])
    table = pd.DataFrame(
        {
            "phase": phase,
            "kernels": ", ".join(f"{k} x{n}" for k, n in counts.items()),
            "attention_pct": pct.at[phase, "attention"] if phase in pct.index else 0.0,
            "linear/matmul_pct": pct.at[phase, "linear/matmul"] if phase in pct.index else 0.0,
        }
        for phase, counts in record["kernels"].items()
    )
    forced = ", ".join(f"{p['backend']} {'ok' if p['ok'] else 'refused'}" for p in att["forced_backends"])
    probes = pd.DataFrame(
        [
            ("backend", f"{att['backend']}; {att['output_attentions']['verdict']}"),
            *(("no Flash", reason) for reason in att["why_not_flash"]),
            ("forced alone", forced),
        ],
        columns=["probe", "result"],
    )
    return "\n".join(
        [
            "attention kernels per phase (float32 run above); _pct: share of the phase's operator self time",
            render(table, floats=".1f"),
            render(probes),
        ]
    )


def precision_frame(prec: dict[str, Any]) -> pd.DataFrame:
    """One row per finding of each traced stage (``stage, finding, detail``): error, first
    mismatch, failing module, fix; ``ok`` for a clean stage, also one whose only mismatches are
    autocast's own casts."""
    rows = []
    for name, st in prec["stages"].items():
        cast = sum(m["mismatch"] == "autocast" for m in st["mismatches"])
        if st["error"] is None and cast == len(st["mismatches"]):
            casts = f" beyond autocast's own casts (in {cast} modules)" if cast else ""
            rows.append((name, "ok", f"no dtype mismatch in {st['calls']} module calls{casts}"))
            continue
        if st["error"]:
            rows.append((name, "error", st["error"]))
        first = st["first_mismatch"]
        if first and "mismatch" in first:  # a flagged call (a Failure has its own row below)
            module = first["module"] or "(outside a module)"
            what = f"{module} ({first['mismatch']}): inputs {first['inputs']} weights {first['weight']}"
            rows.append((name, "first mismatch", f"{what} outputs {first.get('outputs', [])}"))
        if st["failure"]:
            f = st["failure"]
            rows.append((name, "failed in", f"{f['module'] or '(outside a module)'} at {f['where']}"))
        if st["advice"]:
            rows.append((name, "fix", st["advice"]))
    return pd.DataFrame(rows, columns=["stage", "finding", "detail"])


def where_half_fails(
    models: dict[str, str], reference: str, dtype: torch.dtype = torch.float16, tokens: int = 4
) -> pd.DataFrame:
    """``diagnose_precision`` on each model source (name -> source, loaded here and voiced with
    ``reference``): the modules where a ``dtype`` cast fails, one row per family and stage."""
    frames = []
    for name, source in models.items():
        tts = load_model(source)
        prepare_voice(tts, reference)
        found = precision_frame(diagnose_precision(tts, reference, dtype, tokens=tokens))
        failed = found[found["finding"] == "failed in"].assign(family=name)
        frames.append(failed[["family", "stage", "detail"]])
    return pd.concat(frames, ignore_index=True)


def policy_frame(tts: ChatterboxTTS, policies: Sequence[str]) -> pd.DataFrame:
    """T3's prefill and decode step under each dtype policy (``measure_policy``, the same model
    each time): medians and interquartile ranges in milliseconds over ``FEW_REPEATS`` runs (the
    fewest whose IQR is a quartile spread), one row per policy."""
    rows = []
    for policy in policies:
        t = measure_policy(tts, policy, repeats=FEW_REPEATS)
        pre, step = t["prefill_s"], t["step_s"]
        rows.append(
            {"policy": policy, "prefill_ms": pre.median * 1e3, "prefill_iqr_ms": pre.iqr * 1e3,
             "step_ms": step.median * 1e3, "step_iqr_ms": step.iqr * 1e3, "repeats": len(step.times)}
        )  # fmt: skip
    return pd.DataFrame(rows)


def parameter_frame(models: dict[str, Any]) -> pd.DataFrame:
    """The bytes of each wrapper's weights (``performance_info()["memory"]["parameter_bytes"]``;
    its static KV caches are apart, in ``kv_cache_bytes``), in MiB: one row per wrapper (name ->
    ``PerformanceOptimizedTTS``)."""
    rows = []
    for name, wrapper in models.items():
        held = wrapper.performance_info()["memory"]["parameter_bytes"]
        rows.append({"model": name, **{f"{k}_mib": v / 2**20 for k, v in held.items()}})
    return pd.DataFrame(rows)


def format_precision(prec: dict[str, Any], width: int = 90) -> str:
    """The precision scenario, then its findings per stage (``precision_frame``), each detail
    wrapped at ``width`` characters under its column (a fix ran to 310 in one line)."""
    title = (
        f"precision {prec['dtype']}"
        + (f" under autocast {prec['autocast']}" if prec["autocast"] else "")
        + " (components cast, conditionals left float32, as in the seed):"
    )
    rows = [
        (stage if i == 0 else "", finding if i == 0 else "", part)
        for stage, finding, detail in precision_frame(prec).itertuples(index=False)
        for i, part in enumerate(textwrap.wrap(detail, width) or [""])
    ]
    return "\n".join([title, render(pd.DataFrame(rows, columns=["stage", "finding", "detail"]))])
