"""Side-by-side benchmark: configurations run interleaved in one process, on the same text,
voice, seed and token cap, reported as absolute numbers and as ratios to the first one.

Random weights make the timing realistic (same shapes, same kernels) and the audio meaningless.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from chatterbox.tts import ChatterboxTTS
from torch.utils.benchmark import Compare, Measurement

from ..core.clock import FEW_REPEATS, measurement, now
from ..core.constants import (
    FRAMES_PER_TOKEN,
    SAMPLE_RATE,
    UPSTREAM_SENTENCE,
    dtype_name,
)
from ..core.errors import CacheError, ConfigError, SourceError, naming_flag
from ..core.families import family_of
from ..core.files import written
from ..core.machine import busy_machine_line, environment, read_bandwidth, slow_spell_line
from ..core.positions import positions_needed
from ..core.progress import progress_bar
from ..core.strict_json import dumps as json_dumps
from ..core.tables import counted, render
from ..instruments.latency import real_time_factor, snr_db
from ..instruments.memory import allocated_bytes, graph_pool_bytes, memory_window, module_bytes
from ..instruments.plots import memory_figure, save
from ..models.builders import MODELS
from ..models.reference import generated_voice, make_reference_wav, reference_line
from ..models.sources import load_model, model_summary, source_family
from ..models.vocode import FlowPlan
from ..runtime.decode import T3Parts, check_new_tokens, checked_prefill, text_tokens
from ..runtime.engine import StreamEngine, check_engine_options
from ..runtime.generation import prepare_voice
from ..runtime.optimized import PerformanceOptimizedTTS, Pipeline, UpstreamTTS
from ..runtime.precision import check_policy
from ..runtime.streaming import StreamConfig, one_shot, quality, stream_all

# upstream: upstream generate (float32). optimized / static / compiled: the wrapper with its dtype
# policy and the eager / static-cache / compiled decode step. -stream: the same streamed (upstream:
# the fork's naive loop; the wrapper: buffered).
CONFIGS = (
    "upstream",
    "optimized",
    "static",
    "compiled",
    "upstream-stream",
    "optimized-stream",
    "compiled-stream",
)
DECODE_OF = {"optimized": "eager", "static": "static", "compiled": "compiled"}


def floor_of(config: str) -> str:
    """Whose weights a configuration's decode steps read: "upstream" or "optimized"."""
    return "upstream" if config.startswith("upstream") else "optimized"


def weights_note(model: str) -> str:
    """What the weights make of the figures: a random build's are its timing only."""
    if model in MODELS:
        return "random weights: timing is realistic (same shapes and kernels), the audio is meaningless"
    return f"weights from {model}"


@dataclass
class Row:
    """One timed run of one configuration: its times (seconds), tokens, S3Gen calls and memory."""

    config: str
    repeat: int
    ttfa_s: float  # time to first audio (the whole generation when not streaming)
    wall_s: float
    audio_s: float
    t3_tokens: int
    t3_prefill_s: float
    t3_step_s: float  # T3 seconds per token after the prefill, sampling included
    s3gen_calls: int
    s3gen_s: float
    memory_growth_bytes: int  # peak above what the process held when the run began (resident or CUDA)
    reserved_growth_bytes: int  # CUDA: the same for the allocator's reserved bytes; 0 on CPU
    t3_compile_s: float = 0.0  # building the static step (compiling it): not in the step time
    s3gen_compile_s: float = 0.0  # compiling the flow's estimator for new window shapes
    phases_s: float = 0.0  # the timed phases added up (T3 prefill, decode, S3Gen, watermark)

    @property
    def rtf(self) -> float:
        """Wall seconds over audio seconds."""
        return real_time_factor(self.wall_s, self.audio_s)

    @property
    def t3_tokens_per_s(self) -> float:
        """T3 decode steps per second (0 where no step was timed)."""
        return 1.0 / self.t3_step_s if self.t3_step_s else 0.0


def step_floor(t3_bytes: int, bandwidth: float) -> float:
    """The physical floor of one decode step: the weight bytes it reads (``T3Parts.step_bytes``)
    read once at the measured bandwidth."""
    return t3_bytes / bandwidth


def run_pipeline(pipeline: Pipeline, text: str, tokens: int, seed: int, **options: Any) -> dict[str, Any]:
    """One capped one-shot generation (``options``: e.g. the wrapper's ``decode``); the row's
    fields from the pipeline's ``last`` run."""
    t0 = now(pipeline.device)
    wav = pipeline.generate(text, max_new_tokens=tokens, seed=seed, **options)
    s = pipeline.last.seconds
    # A step built (compiled) in this run is reported apart and kept out of wall and TTFA.
    wall = now(pipeline.device) - t0 - s.get("t3.compile", 0.0)
    return dict(
        ttfa_s=wall,
        wall_s=wall,
        audio_s=wav.shape[1] / SAMPLE_RATE,
        t3_tokens=pipeline.last.tokens,
        t3_prefill_s=s["t3.prefill"],
        t3_step_s=s["t3.step"],
        s3gen_calls=1,
        s3gen_s=s["s3gen"],
        t3_compile_s=s.get("t3.compile", 0.0),
        phases_s=sum(s.get(k, 0.0) for k in ("t3.prefill", "t3.decode", "s3gen", "watermark")),
    )


def engine_step_ms(engine: StreamEngine, text: str, streams: int, tokens: int) -> float:
    """T3's ms per batched step in ``engine`` (warmed up first: its compiles are kept out) for
    ``streams`` streams of ``text`` joining at one step, each read to its ``tokens``-token end;
    the steps of this call only, so one engine serves many calls (and compiles once)."""
    engine.warmup()
    t3_s, steps = engine.stats.t3_s, engine.stats.t3_steps
    with engine.together():
        handles = [engine.submit(text, seed=k, max_new_tokens=tokens) for k in range(streams)]
    for h in handles:
        for _ in h:
            pass
    return (engine.stats.t3_s - t3_s) / (engine.stats.t3_steps - steps) * 1e3


def check_bench_options(
    configs: tuple[str, ...], repeats: int, warmup: int, dtype: str, device: str, *,
    cpp_wrapper: bool, fused: bool,
) -> None:  # fmt: skip
    """Refuse, before any model loads, options no bench can run: a dtype that is no policy, no
    or unknown or repeated configs, repeats below 1 or warmup below 0, and ``cpp_wrapper`` or
    ``fused`` without a config whose step uses it (``cpp_wrapper`` on CUDA too)."""
    check_policy(dtype)
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be at least 1 and warmup at least 0, got {repeats} and {warmup}")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        what = f"unknown configs {unknown}" if unknown else "no config given"
        raise ConfigError(f"argument --configs: {what}: choose from {', '.join(CONFIGS)}")
    if twice := sorted({c for c in configs if configs.count(c) > 1}):
        raise ConfigError(f"argument --configs: {', '.join(twice)} given twice: name each config once")
    if cpp_wrapper and not any(c.startswith("compiled") for c in configs):
        raise ConfigError(
            "argument --cpp-wrapper: only the compiled decode step has a C++ wrapper: add compiled or "
            "compiled-stream to --configs, or leave --cpp-wrapper out"
        )
    if fused and not any(PLAN_OF.get(c) in ("static", "compiled") for c in configs):
        raise ConfigError(
            "argument --fused: only the static and compiled decode steps run the fused copy: add static, "
            "compiled or compiled-stream to --configs, or leave --fused out"
        )
    if cpp_wrapper and device.startswith("cuda"):  # the step would drop it and the report record it
        raise ConfigError(
            "argument --cpp-wrapper: the C++ wrapper applies without CUDA graphs only, and on CUDA the "
            "compiled step runs as CUDA graphs: leave --cpp-wrapper out, or bench with --device cpu"
        )


def run_bench(
    model: str = "tiny",
    configs: tuple[str, ...] = ("upstream", "optimized"),
    tokens: int = 20,
    repeats: int = 2,
    seed: int = 0,
    text: str = UPSTREAM_SENTENCE,
    reference: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    outdir: str | Path = "runs/bench",
    warmup: int = 1,
    cpp_wrapper: bool = False,
    fused: bool = False,
    family: str | None = None,
) -> dict[str, Any]:
    """Run every configuration ``repeats`` times, interleaved; return rows, summary and floors.
    ``family``: which model to load of a ``model`` folder holding two (as ``load_model`` takes it).
    ``warmup`` untimed runs of each configuration come first (the process's first generation pays
    its one-time costs, lazy set-up and first allocations; on CUDA the first call of a path pays
    for kernel loading, cuBLAS/cuDNN handles and the caching allocator's first growth; before
    2026-12-07 none by default, and the report warned of its own default).
    ``cpp_wrapper``: the wrapper's compiled step with Inductor's C++ wrapper (``DecodePlan``); on a
    CPU only (refused on CUDA, whose compiled step runs as CUDA graphs, which have none).
    ``fused``: the wrapper's static and compiled steps with fused projections (``DecodePlan``)."""
    check_bench_options(configs, repeats, warmup, dtype, device, cpp_wrapper=cpp_wrapper, fused=fused)
    if fused:  # as load and serve refuse it: a name's family, or a folder's, is known before it loads
        with naming_flag("--model", SourceError):  # the step matters to --alignment only, which bench has not
            check_engine_options(source_family(model, family), "static", alignment=False, fused=True)
    # Two copies of the same weights (same seed or folder): upstream as upstream loads it
    # (float32), and the optimized wrapper with its own dtype policy.
    with naming_flag("--model", SourceError):  # a folder unreadable or unfit: named as stream names it
        upstream_model = load_model(model, device, seed, family)
    cap = family_of(upstream_model).upstream_cap  # a folder's family is known once it loads
    if "upstream" in configs and tokens > cap:  # the others would decode more
        raise ConfigError(
            f"argument --tokens: {tokens} is past upstream generate's own cap of {cap} tokens, so the "
            f"upstream config would decode fewer than the others: give {cap} or fewer, or leave upstream "
            "out of --configs"
        )
    with naming_flag("--tokens", CacheError, ConfigError):  # before anything is written
        check_new_tokens(upstream_model.t3, tokens)
    for m in (upstream_model.t3, upstream_model.s3gen, upstream_model.ve):
        m.float()
    with naming_flag("--text", ConfigError):  # before anything is written: a text past T3's positions
        text_tokens(upstream_model, text, 0.0)
    outdir = Path(outdir)

    def prefill_that_fits() -> int:
        """T3's prefill for ``text`` with the voice prepared: past a GPT-2 backbone's positions
        (Turbo's) no cache can hold the run (before: named "max_cache_len 9367 is past ...", a
        flag the bench has not)."""
        with naming_flag("--tokens", CacheError):
            return checked_prefill(upstream_model, text, tokens, name="--tokens")

    if reference:  # the user's: refused (as --reference) before the folder is made
        with naming_flag("--reference", SourceError):
            ref = prepare_voice(upstream_model, reference)
        prefill = prefill_that_fits()
    else:  # kept in outdir once the run is known to fit
        with generated_voice(outdir / "reference.wav") as wav:
            ref = prepare_voice(upstream_model, str(wav))
            prefill = prefill_that_fits()
        reference = str(outdir / "reference.wav")
        ref = replace(ref, path=reference)
    outdir.mkdir(parents=True, exist_ok=True)
    upstream = UpstreamTTS(upstream_model)
    dev = torch.device(device)
    before_open = allocated_bytes(dev)
    # With no config running the wrapper its policy is upstream's float32: "auto" would time T3's
    # policies for nothing and record whichever won that moment (a loaded machine once recorded
    # decode-bfloat16 for an upstream-only bench).
    policy = dtype if any(c in PLAN_OF for c in configs) else "float32"
    optimized = PerformanceOptimizedTTS(
        load_model(model, device, seed, family), policy=policy, decode="eager", cpp_wrapper=cpp_wrapper,
        fused=fused,
    )  # fmt: skip
    after_open = allocated_bytes(dev)
    # Measured, beside the tensors counted: what the open wrapper's model holds on the GPU (its
    # weights and islands, and any originals kept to restore the model: before 2026-12-04 a
    # bfloat16 wrapper kept the float32 ones there, which no counted column showed).
    open_gib = None if before_open is None or after_open is None else (after_open - before_open) / 2**30
    with closing(optimized) as opt:  # after an error too: the model given back, its caches freed
        opt.prepare_conditionals(reference)
        # The wrapper as it comes: its default cache (a step attends to the smallest span of it,
        # 256, 512, ..., that holds the run), so the memory table shows what a user's wrapper holds
        # and its compiled graphs are the ones the wrapper compiles elsewhere (Inductor's cache
        # serves them); longer only when this run would not fit.
        need = positions_needed(prefill, tokens)
        if need > opt.max_cache_len:
            opt.set_max_cache_len(need)

        def wrapper(step: str) -> Callable[[int], dict[str, Any]]:
            return lambda s: run_pipeline(opt, text, tokens, s, decode=step)

        runners: dict[str, Callable[[int], dict[str, Any]]] = {
            "upstream": lambda s: run_pipeline(upstream, text, tokens, s),
            **{c: wrapper(step) for c, step in DECODE_OF.items()},
        }
        runners.update(_stream_runners(upstream_model, opt, text, tokens))
        # The fused backbone made now, once the cache is sized (resizing drops it): made by the first
        # run that builds its step, it fell inside that run's memory window, so its run growth held
        # the copy that weights_gib counts too, and total_gib counted it twice.
        if fused:
            for step in {PLAN_OF[c] for c in configs if c in PLAN_OF} & {"static", "compiled"}:
                _ = opt.plans[step].step_parts  # (a property: the copy is made on first use)
        bandwidth = read_bandwidth(device)
        runs = [("warm-up", r, c) for r in range(warmup) for c in configs]
        runs += [("repeat", r, c) for r in range(repeats) for c in configs]
        rows: list[Row] = []
        # Whichever run built it (warm-up or not): T3's step per plan, as compiled and
        # compiled-stream run one, built by the first of them; the estimator per configuration.
        step_compile: dict[str, float] = {}
        estimator_compile: dict[str, float] = {}
        with progress_bar(runs, desc="bench", unit="run") as bar:
            for kind, r, c in bar:
                bar.set_postfix_str(f"{c}, {kind} {r + 1}")
                with memory_window(dev) as memory:
                    out = runners[c](seed)
                plan = PLAN_OF.get(c, c)  # (an upstream config: a key of its own, never built)
                step_compile[plan] = max(step_compile.get(plan, 0.0), out.get("t3_compile_s", 0.0))
                estimator_compile[c] = max(estimator_compile.get(c, 0.0), out.get("s3gen_compile_s", 0.0))
                if kind == "repeat":
                    grown = {"memory_growth_bytes": memory.growth_bytes,
                             "reserved_growth_bytes": memory.reserved_growth_bytes}  # fmt: skip
                    rows.append(Row(config=c, repeat=r, **grown, **out))
        # Again after the runs: a slow spell of the host still on at one of the two probes shows
        # (``slow_spell_line``; one that began and ended between them, only in the repeats' spread).
        bandwidth_after = read_bandwidth(device)
        compile_s = {c: step_compile[PLAN_OF.get(c, c)] + estimator_compile[c] for c in configs}
        # One recorded (not timed) optimized run: which attention kernel ran, in which dtype. After
        # the timed runs, so it warms none of them (--warmup says what did); none without a wrapper config.
        kernels: dict[str, dict[str, int]] = {}
        if any(floor_of(c) == "optimized" for c in configs):
            opt.record_attention = True
            run_pipeline(opt, text, min(tokens, 8), seed)
            opt.record_attention = False
            kernels = opt.last.kernels
        floors: dict[str, dict[str, Any]] = {
            "upstream": {"dtype": "float32", "t3_bytes": T3Parts.of(upstream_model.t3).step_bytes()},
            "optimized": {
                "dtype": dtype_name(opt.plan.decode.dtype),
                "t3_bytes": opt.plan.decode.step_bytes(),
            },
        }
        for f in floors.values():
            f["floor_s"] = step_floor(f["t3_bytes"], bandwidth)
        configuration = opt.configuration()
        report: dict[str, Any] = {
            "environment": environment(model, device),
            "note": weights_note(model),
            "reference": asdict(ref),  # what was done to it (a stereo or resampled file's notes)
            "settings": dict(
                configs=list(configs),
                tokens=tokens,
                repeats=repeats,
                warmup=warmup,
                seed=seed,
                text=text,
                cpp_wrapper=cpp_wrapper,
                fused=fused,
            ),
            "optimized_policy": {
                "policy": opt.policy,
                "reason": opt.policy_choice.reason,
                "decode": opt.plan.describe(),
            },
            "attention_kernels_optimized": kernels,
            "compile_s": compile_s,
            "compile_fallback": configuration["compile_fallback"],
            # the compiled step's attention op, read from Inductor's code (None: nothing compiled)
            "compiled_attention": configuration["compiled_attention"],
            "flow_compile_fallback": configuration["flow_compile_fallback"],
            "read_bandwidth_gb_s": bandwidth / 1e9,  # before the runs (the floors')
            "read_bandwidth_after_gb_s": bandwidth_after / 1e9,
            "floors": floors,
            "rows": [{**asdict(r), "rtf": r.rtf, "t3_tokens_per_s": r.t3_tokens_per_s} for r in rows],
            "summary": summarize(rows, floors),
            "memory": {
                **memory_per_config(rows, upstream_model, opt, dev, memory.how),
                "wrapper_open_gib": open_gib,
            },
        }
    report["files"] = {name: str(outdir / name) for name in ("bench.json", "bench.csv", "memory.png")}
    # Each file whole or absent; the report last, so it lists only files that were written.
    written(outdir / "bench.csv", lambda path: pd.DataFrame(report["rows"]).to_csv(path, index=False))
    save(memory_figure(memory_frame(report), dev.type), outdir / "memory.png")
    written(outdir / "bench.json", lambda path: path.write_text(json_dumps(report)))
    return report


def run_stream(
    tts: ChatterboxTTS,
    config: StreamConfig,
    text: str,
    tokens: int,
    seed: int,
    plan: Any = None,
    amp: Any = None,
    flow: FlowPlan | None = None,
) -> dict[str, Any]:
    """One stream of ``text`` under ``config`` (the decode ``plan``, ``amp``, the estimator as
    ``flow`` runs it), summarised as a bench row's fields."""
    _, state = stream_all(tts, text, config, max_new_tokens=tokens, seed=seed, plan=plan, amp=amp, flow=flow)
    s = state.report.summary()
    # Compiling (T3's step before the first token, the estimator at a window of a new shape)
    # is reported apart and kept out of TTFA and wall: out of TTFA only what came before the
    # first chunk (a later window's new shape compiles after it).
    compiling = state.t3.compile_s + state.s3gen_compile_s
    return dict(
        ttfa_s=s["ttfa_s"] - state.compile_before_first_s,
        wall_s=s["wall_s"] - compiling,
        audio_s=s["audio_s"],
        t3_tokens=state.t3.steps,  # kept, invalid ids too, like the one-shot rows (state.tokens: valid ones)
        t3_prefill_s=state.t3.prefill_s,
        t3_step_s=state.t3.step_s,
        s3gen_calls=s["s3gen_calls"],
        s3gen_s=s["flow_s"] + s["vocoder_s"],
        t3_compile_s=state.t3.compile_s,
        s3gen_compile_s=state.s3gen_compile_s,
        phases_s=state.t3.prefill_s + state.t3.decode_s + s["flow_s"] + s["vocoder_s"],
    )


def _stream_runners(
    upstream: ChatterboxTTS, opt: PerformanceOptimizedTTS, text: str, tokens: int
) -> dict[str, Callable[[int], dict[str, Any]]]:
    """Upstream streaming = the fork's naive loop on the upstream model; the wrapper's = buffered,
    with the eager decode step and estimator, or both compiled."""
    buffered = StreamConfig("buffered")
    return {
        "upstream-stream": lambda s: run_stream(upstream, StreamConfig("naive"), text, tokens, s),
        "optimized-stream": lambda s: run_stream(
            opt.tts, buffered, text, tokens, s, plan=opt.plans["eager"], amp=opt.amp
        ),
        "compiled-stream": lambda s: run_stream(
            opt.tts,
            buffered,
            text,
            tokens,
            s,
            plan=opt.plans["compiled"],
            amp=opt.amp,
            flow=opt.flows["compiled"],
        ),
    }


def summarize(rows: list[Row], floors: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Min and median per configuration, and the ratio of medians to the first configuration."""
    out = []
    names = list(dict.fromkeys(r.config for r in rows))
    for name in names:
        mine = [r for r in rows if r.config == name]
        s: dict[str, Any] = {"config": name, "repeats": len(mine)}
        for key in ("ttfa_s", "wall_s", "rtf", "t3_step_s", "t3_prefill_s", "s3gen_s"):
            values = [getattr(r, key) for r in mine]
            s[f"{key}_min"], s[f"{key}_median"] = min(values), statistics.median(values)
        s["s3gen_calls"] = mine[0].s3gen_calls
        s["s3gen_per_call_s_median"] = statistics.median(r.s3gen_s / max(1, r.s3gen_calls) for r in mine)
        s["audio_s"] = mine[0].audio_s
        s["t3_tokens"] = mine[0].t3_tokens  # what its ratios stand for (same text, seed and cap each repeat)
        # How much of the wall time the phase timers account for (they wait for the device).
        s["phases_over_wall_median"] = statistics.median(r.phases_s / r.wall_s for r in mine)
        floor = floors[floor_of(name)]["floor_s"]
        s["t3_step_vs_floor"] = s["t3_step_s_median"] / floor if floor else None
        out.append(s)
    first = out[0]
    for s in out:
        for key in ("ttfa_s", "wall_s", "t3_step_s", "s3gen_s"):
            base = first[f"{key}_median"]
            s[f"{key}_ratio"] = s[f"{key}_median"] / base if base else None
    return out


# Which decode plan (weights and static cache) each wrapper configuration runs.
PLAN_OF = {**DECODE_OF, "optimized-stream": "eager", "compiled-stream": "compiled"}
# The configurations whose S3Gen estimator is compiled (a compiled FlowPlan, ``_stream_runners``):
# the one-shot ones run S3Gen eagerly, so their compile_s is T3's step alone.
COMPILED_ESTIMATOR = ("compiled-stream",)


def sharing_a_step(configs: list[str]) -> list[str]:
    """Those of ``configs`` that run a built (static or compiled) T3 step another of them runs too:
    it is built once, by whichever runs first, and its compile is in each one's compile_s."""
    plans = [PLAN_OF.get(c) for c in configs]
    return [c for c, p in zip(configs, plans, strict=True) if p not in (None, "eager") and plans.count(p) > 1]


def memory_per_config(
    rows: list[Row], upstream: ChatterboxTTS, opt: PerformanceOptimizedTTS, device: torch.device, how: str
) -> dict[str, Any]:
    """Each configuration's own memory: the weights it runs (from their tensors), the static KV
    cache it keeps, and the most one of its timed runs rose above what the process held before
    it (activations and whatever the run allocated). A run that built its static step (the
    first, with ``warmup=0``) also holds what building and compiling allocated for a while: the
    runs that did not build are taken where there are any (``growth_run_built`` False); where
    every run built, the cache is taken off their growth, as it is counted once, in
    ``kv_cache_gib``, and ``growth_run_built`` says the compile's memory is in it. CUDA's
    ``reserved_growth_gib`` comes from the same runs, taken alike.
    ``total_gib``: what that configuration alone would hold."""
    per: dict[str, Any] = {}
    for c in dict.fromkeys(r.config for r in rows):
        if c in PLAN_OF:
            plan = opt.plans[PLAN_OF[c]]
            parts = [*plan.prefill.modules(), *plan.decode.modules()]
            if plan.step != "eager":  # a fused plan's copy (the eager step runs the model's own)
                parts += plan.step_parts.modules()
            weights = module_bytes([*_model_modules(opt.tts, device), *parts])
            cache = plan.static_bytes()
        else:
            weights, cache = module_bytes(_model_modules(upstream, device)), 0
        mine = [r for r in rows if r.config == c]
        unbuilt = [r for r in mine if r.t3_compile_s == 0 and r.s3gen_compile_s == 0]
        taken = unbuilt or mine
        growth = _most_grown(taken, cache, lambda r: r.memory_growth_bytes)
        # From the same runs (before 2026-12-04: from every run, so a build's window, which also
        # reserved the compile's workspace and CUDA graph pool, stood beside the others' growth).
        reserved = _most_grown(taken, cache, lambda r: r.reserved_growth_bytes)
        per[c] = {
            "weights_gib": weights / 2**30,
            "kv_cache_gib": cache / 2**30,
            "run_growth_gib": growth / 2**30,
            "growth_run_built": not unbuilt,  # every run built its step: its compile is in it
            "reserved_growth_gib": reserved / 2**30,
            "total_gib": (weights + cache + growth) / 2**30,
        }
    return {"device": device.type, "how": how, "graph_pools_gib": graph_pool_bytes(device) / 2**30,
            "configs": per}  # fmt: skip


def _model_modules(tts: ChatterboxTTS, device: torch.device) -> list[torch.nn.Module]:
    """The modules of a model whose weights a configuration holds on ``device``: T3, S3Gen and the
    voice encoder, and on a CPU the watermarker's network, which upstream always loads on the CPU
    and the one-shot runs use (on CUDA it sits outside the allocator these figures describe)."""
    modules: list[torch.nn.Module] = [tts.t3, tts.s3gen, tts.ve]
    watermark = getattr(getattr(tts, "watermarker", None), "perth_net", None)
    if device.type == "cpu" and isinstance(watermark, torch.nn.Module):
        modules.append(watermark)
    return modules


def _most_grown(runs: list[Row], cache: int, grown: Callable[[Row], int]) -> int:
    """The most one of ``runs`` grew by ``grown`` (bytes), less the ``cache`` a run that built its
    step allocated inside its window."""
    return max(max(0, grown(r) - (cache if r.t3_compile_s > 0 else 0)) for r in runs)


def memory_frame(report: dict[str, Any]) -> pd.DataFrame:
    """One row per configuration: weights, KV cache, the run's own growth, their total (GiB)."""
    return pd.DataFrame([{"config": c, **m} for c, m in report["memory"]["configs"].items()])


def compare_families(
    models: dict[str, str],
    tokens: int = 50,
    text: str = UPSTREAM_SENTENCE,
    reference: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    outdir: str | Path = "runs/families",
) -> pd.DataFrame:
    """The families side by side, one row each (``models``: family -> model source): parameters,
    where a capped upstream one-shot generation spends its time, and a buffered stream of the
    same text. Times are per token, per call and per second of audio, so families compare."""
    reference = reference or str(make_reference_wav(Path(outdir) / "reference.wav"))
    rows = []
    for family, source in progress_bar(models.items(), desc="families", unit="family"):
        tts = load_model(source, device, seed)
        prepare_voice(tts, reference)
        params = {name: float(cast(int, c["parameters"])) / 1e6 for name, c in model_summary(tts).items()}
        upstream = UpstreamTTS(tts)
        one = run_pipeline(upstream, text, tokens, seed)
        t3 = upstream.last.seconds["t3.prefill"] + upstream.last.seconds["t3.decode"]
        streamed = run_stream(tts, StreamConfig("buffered"), text, tokens, seed)
        rows.append(
            {
                "family": family,
                "model": source,
                "t3_params_m": params["t3"],
                "s3gen_params_m": params["s3gen"],
                "t3_ms_per_tok": 1e3 * one["t3_step_s"],
                "t3_s_per_audio_s": t3 / one["audio_s"],
                "s3gen_s_per_audio_s": one["s3gen_s"] / one["audio_s"],
                "one_shot_rtf": one["wall_s"] / one["audio_s"],
                "stream_s3gen_calls": streamed["s3gen_calls"],
                "stream_ms_per_call": 1e3 * streamed["s3gen_s"] / streamed["s3gen_calls"],
                "stream_ttfa_s": streamed["ttfa_s"],
                "stream_rtf": streamed["wall_s"] / streamed["audio_s"],
            }
        )
    return pd.DataFrame(rows)


def bench_frame(report: dict[str, Any]) -> pd.DataFrame:
    """One row per configuration: medians, throughput beside the floor, ratios to the first."""
    compile_s = report.get("compile_s", {})
    rows = []
    for s in report["summary"]:
        step = s["t3_step_s_median"]
        floor = report["floors"][floor_of(s["config"])]
        rows.append(
            {
                "config": s["config"],
                "tokens": s.get("t3_tokens"),  # (not in reports written before it was kept)
                "ttfa_s": s["ttfa_s_median"],
                "wall_s": s["wall_s_median"],
                "rtf": s["rtf_median"],
                "t3_ms_per_tok": step * 1e3,
                "tok_per_s": 1 / step if step else 0.0,
                "gb_per_s": floor["t3_bytes"] / step / 1e9 if step else 0.0,
                "x_floor": s["t3_step_vs_floor"] or float("nan"),
                "prefill_s": s["t3_prefill_s_median"],
                "s3gen_s": s["s3gen_s_median"],
                "s3gen_calls": s["s3gen_calls"],
                "s3gen_ms_per_call": 1e3
                * s.get("s3gen_per_call_s_median", s["s3gen_s_median"] / s["s3gen_calls"]),
                "wall_ratio": s["wall_s_ratio"],
                "step_ratio": s["t3_step_s_ratio"],
                "compile_s": compile_s.get(s["config"], 0.0),
                "phases_over_wall": s.get("phases_over_wall_median", 0.0),
            }
        )
    return pd.DataFrame(rows)


# The timings whose repeats go into the Compare table, and their column names.
REPEATED = {"t3_step_s": "T3 step", "t3_prefill_s": "T3 prefill", "ttfa_s": "first audio", "wall_s": "wall"}


def bench_measurements(report: dict[str, Any]) -> list[Measurement]:
    """Every configuration's timed repeats as ``torch.utils.benchmark`` Measurements, for one
    ``Compare`` table: a row per configuration, a column per timing (``REPEATED``)."""
    env, settings = report["environment"], report["settings"]
    label = f"bench: {env['model']} on {env['device']}, {settings['tokens']} tokens"
    rows = pd.DataFrame(report["rows"])
    return [
        measurement(mine[key].tolist(), label, column, config, env["torch_threads"])
        for config, mine in rows.groupby("config", sort=False)
        for key, column in REPEATED.items()
    ]


def format_bench(report: dict[str, Any]) -> str:
    """The terminal report: what ran where, ``bench_frame`` rendered, the repeats' spread
    (``bench_measurements`` in a ``Compare`` table) and the memory per configuration."""
    env = report["environment"]
    lines = [
        # (reports written before 2026-12-07 name no CPU)
        f"model {env['model']} on {env['device']} ({env.get('cpu', env['processor'])}"
        f"{', ' + env['cpu_capability'] if 'cpu_capability' in env else ''}, {env['cpu_count']} CPUs), "
        f"torch {env['torch']}, transformers {env['transformers']}, chatterbox-tts {env['chatterbox-tts']}",
        # (reports written before 2026-12-06 have no reference)
        *([f"reference {reference_line(report['reference'])}"] if "reference" in report else []),
        f"{report['settings']['tokens']} tokens, {counted(report['settings']['repeats'], 'timed run')} "
        f"(after {report['settings'].get('warmup', 0)} untimed), "
        f"medians; ratio = median / first config's median. Note: {report['note']}.",
        f"optimized policy: {report['optimized_policy']['policy']} "
        f"({report['optimized_policy']['decode']}); {report['optimized_policy']['reason']}",
        f"read bandwidth {report['read_bandwidth_gb_s']:.1f} GB/s; T3 decode-step floor: "
        + ", ".join(f"{k} {v['floor_s'] * 1e3:.1f} ms ({v['dtype']})" for k, v in report["floors"].items()),
        *busy_machine_line(env),
        # (none in reports before late 2026-12-07)
        *slow_spell_line(
            [
                ("before the runs", report["read_bandwidth_gb_s"]),
                ("after them", report.get("read_bandwidth_after_gb_s")),
            ]
        ),
        "",
        render(
            bench_frame(report),
            {"t3_ms_per_tok": ".1f", "tok_per_s": ".1f", "gb_per_s": ".1f", "s3gen_ms_per_call": ".0f"},
        ),
    ]
    if not report["settings"].get("warmup", 0):
        lines.append(
            "no untimed run: the first configuration's first run also paid the process's one-time "
            "costs (lazy set-up, first allocations), which raise its median where the repeats are few, "
            "and so every ratio to it: --warmup 1 evens them"
        )
    compare = Compare(bench_measurements(report))
    compare.highlight_warnings()  # (! XX%): the IQR is a large share of the median
    lines += ["", str(compare).strip()]
    if (repeats := report["settings"]["repeats"]) < FEW_REPEATS:
        # Quartiles of one run are that run; of two or three, a share of their range.
        lines.append(
            f"spread: the interquartile range of {repeats} repeat{'s' if repeats > 1 else ''} is not a "
            f"quartile spread ({'none can show' if repeats == 1 else 'part of their range'}): "
            f"--repeats {FEW_REPEATS} or more for one"
        )
    memory = report["memory"]
    frame = memory_frame(report)
    if memory["device"] != "cuda":
        frame = frame.drop(columns="reserved_growth_gib")
    lines += [
        "",
        f"memory per configuration (GiB; run growth: {memory['how']}; total = weights + KV cache + growth):",
        render(frame, dict.fromkeys(frame.columns[1:], ".3f")),
    ]
    if memory["graph_pools_gib"]:
        pools = memory["graph_pools_gib"]
        lines.append(f"CUDA graph pools held after the bench (every compiled step): {pools:.3f} GiB")
    if memory.get("wrapper_open_gib") is not None:  # (absent from files written before 2026-12-04)
        lines.append(
            f"the optimized model as the open wrapper holds it on the device, measured (allocator, "
            f"before its model loaded and after the wrapper opened): {memory['wrapper_open_gib']:.3f} GiB"
        )
    if report.get("compiled_attention"):
        found = ", ".join(report["compiled_attention"])
        lines.append(f"compiled T3 step's attention: {found} (read from Inductor's generated code)")
    if report.get("compile_fallback"):
        lines.append(f"compile failed, the static step ran instead: {report['compile_fallback']}")
    if report.get("flow_compile_fallback"):
        lines.append(f"estimator compile failed, it ran eagerly: {report['flow_compile_fallback']}")
    estimator = any(c in COMPILED_ESTIMATOR for c in report["settings"]["configs"])
    compiled = "T3's step and S3Gen's estimator" if estimator else "T3's step"
    shared = sharing_a_step(report["settings"]["configs"])
    lines.append(
        "gb_per_s: T3 weight bytes read per decode step / step time (the floor's bytes); "
        "phases_over_wall: the timed phases (T3, S3Gen, watermark) over the wall time; "
        f"compile_s: {compiled}, kept out of TTFA and wall"
        + (f"; {' and '.join(shared)} share one T3 step, built once and shown on both" if shared else "")
    )
    if "files" in report:
        lines.append(f"wrote {', '.join(report['files'].values())}")
    return "\n".join(lines)


def compare_streaming(
    tts: ChatterboxTTS,
    configs: dict[str, StreamConfig],
    text: str = UPSTREAM_SENTENCE,
    tokens: int = 250,
    seed: int = 0,
    plan: Any = None,
) -> list[dict[str, Any]]:
    """Stream the same tokens (same seed, same T3 plan) with each config, then the one-shot S3Gen
    call over those tokens; per row the S3Gen work, the latency and the quality vs one-shot."""
    rows: list[dict[str, Any]] = []
    full: np.ndarray | None = None  # one-shot with the whole prompt, the yardstick for every row
    for name, config in progress_bar(configs.items(), desc="strategies"):
        wav, state = stream_all(tts, text, config, max_new_tokens=tokens, seed=seed, plan=plan)
        if full is None:  # every config speaks the same tokens (same seed and plan)
            t0 = now(tts.device)
            full = one_shot(tts, state, StreamConfig())
            one_shot_row = {
                "name": "one-shot S3Gen",
                "s3gen_calls": 1,
                "s3gen_s": now(tts.device) - t0,
                "audio_s": len(full) / SAMPLE_RATE,
                "tokens": len(state.tokens),
                "prompt_frames": FRAMES_PER_TOKEN * int(tts.conds.gen["prompt_token"].size(1)),
                "context_frames": 0,
                "new_frames": FRAMES_PER_TOKEN * len(state.tokens),
            }
        s = state.report.summary()
        same_prompt = one_shot(tts, state, config)
        rows.append(
            {
                "name": name,
                **s,
                "s3gen_s": s["flow_s"] + s["vocoder_s"],
                **quality(wav, same_prompt, state),
                "snr_vs_full_prompt_one_shot_db": snr_db(wav, full, state.crossfades),
            }
        )
    rows.append(one_shot_row)
    base = rows[-1]["s3gen_s"]
    for r in rows:
        r["s3gen_vs_one_shot"] = r["s3gen_s"] / base
    return rows


def stream_quality(
    tts: ChatterboxTTS, waves: dict[str, np.ndarray], states: dict[str, Any], configs: dict[str, StreamConfig]
) -> pd.DataFrame:
    """Each streamed utterance (name -> audio, its ``StreamState`` and config) against one S3Gen
    call over its own tokens (``one_shot``, same noise and prompt): seam jumps and SNR, one row
    per name. ``seam_max_over_median`` at or below ``ordinary_max_over_median``: no click."""
    rows = []
    for name, wav in waves.items():
        q = quality(wav, one_shot(tts, states[name], configs[name]), states[name])
        rows.append({"strategy": name, **q})
    return pd.DataFrame(rows)


def streaming_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The streaming comparison, one row per strategy (seam = seam jump / largest other jump)."""
    out = []
    for r in rows:
        row: dict[str, Any] = {
            "strategy": r["name"],
            "s3gen_calls": r["s3gen_calls"],
            "prompt/ctx/new_frames": f"{r['prompt_frames']}/{r['context_frames']}/{r['new_frames']}",
            "s3gen_s": r["s3gen_s"],
            "x_one_shot": r["s3gen_vs_one_shot"],
        }
        if "ttfa_s" in r:
            row |= {
                "ttfa_s": r["ttfa_s"],
                "wall_s": r["wall_s"],
                "rtf": r["rtf"],
                "underruns": f"{r['underruns']} ({r['underrun_s']:.1f} s)",
                "seam_ratio": _seam_ratio(r["seam_max_over_median"], r["ordinary_max_over_median"]),
                "snr_db": r["snr_db"],
                "snr_vs_full_db": r["snr_vs_full_prompt_one_shot_db"],
            }
        out.append(row)
    return pd.DataFrame(out)


def _seam_ratio(seam: float | None, ordinary: float) -> float:
    """Seam jump over the largest other jump; NaN where there is no seam (one chunk) or no
    other jump (a silent stream: all its samples zero, e.g. NaN samples zeroed)."""
    return seam / ordinary if seam is not None and ordinary else float("nan")


def format_streaming(rows: list[dict[str, Any]]) -> str:
    """``streaming_frame`` rendered (times in seconds)."""
    return render(streaming_frame(rows), {"snr_db": ".1f", "snr_vs_full_db": ".1f"})
