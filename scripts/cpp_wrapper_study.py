"""The compiled T3 step with Inductor's Python wrapper vs its C++ wrapper, beside upstream's
decode, side by side in one process (runs interleaved), on `deep-narrow`, where a step is mostly
the host calling ~400 small kernels, so the wrapper that calls them matters.

Three pipelines on three copies of the same weights, each a one-shot capped generation as in
the bench (`bench.run_pipeline`): upstream's `generate` (float32), and the optimized wrapper
(float32 policy, so the tokens can be compared) with the compiled step, once with each wrapper.
T3 ms per decode step, medians over the repeats with every value kept; compile seconds apart.
(Same tokens with either wrapper: on the tiny model, the C++-wrapper step compiled for real sampled
the eager step's tokens, checked by hand on 2026-12-06. The suite does not check it, as that compile
takes ~20 s (tests/test_static_decode.py swaps torch.compile for identity): this script is where a
C++-wrapper step is compiled and measured.)

    .venv/bin/python scripts/cpp_wrapper_study.py [--repeats 5] > run.json

(results/cpp_wrapper_cpu_deep_narrow.json holds four such runs under "runs", two on each of two days.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from tts_workbench.core.machine import environment
from tts_workbench.core.quiet import upstream_silenced
from tts_workbench.models.builders import build_model
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.runtime.generation import prepare_voice
from tts_workbench.runtime.optimized import PerformanceOptimizedTTS, UpstreamTTS
from tts_workbench.studies.bench import run_pipeline

TEXT = "The quick brown fox jumps over the lazy dog."
TOKENS = 150


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.repeats < 1:  # the medians need one kept round (the first compiles)
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    # upstream's prints would land in the JSON on stdout; the voice is removed after the run
    with tempfile.TemporaryDirectory() as tmp, upstream_silenced():
        reference = str(make_reference_wav(Path(tmp) / "reference.wav"))
        models = []
        for _ in range(3):
            torch.manual_seed(0)  # the same random weights in each copy
            models.append(build_model("deep-narrow"))
        upstream = UpstreamTTS(models[0])
        prepare_voice(models[0], reference)
        pipelines: dict[str, Any] = {"upstream": upstream}
        for name, tts, cpp in (("compiled", models[1], False), ("compiled, C++ wrapper", models[2], True)):
            opt = PerformanceOptimizedTTS(tts, policy="float32", decode="compiled", cpp_wrapper=cpp)
            opt.prepare_conditionals(reference)
            opt.set_max_cache_len(opt.prefill_length(TEXT) + TOKENS)  # one span: the run's length
            pipelines[name] = opt
        ms: dict[str, list[float]] = {name: [] for name in pipelines}
        compile_s: dict[str, float] = {}
        for k in range(args.repeats + 1):  # the first round compiles and is not kept
            for name, pipeline in pipelines.items():
                row = run_pipeline(pipeline, TEXT, TOKENS, seed=0)
                if k == 0:
                    compile_s[name] = row["t3_compile_s"]
                else:
                    ms[name].append(row["t3_step_s"] * 1e3)
    med = {name: statistics.median(v) for name, v in ms.items()}
    out = {
        "environment": environment("deep-narrow (random weights)", "cpu"),
        "tokens": TOKENS,
        "repeats": args.repeats,
        "t3_ms_per_step": ms,
        "median_t3_ms_per_step": med,
        "upstream_over": {name: med["upstream"] / m for name, m in med.items() if name != "upstream"},
        "cpp_over_python_wrapper": med["compiled, C++ wrapper"] / med["compiled"],
        "compile_s_first_round": compile_s,
        "note": "random weights almost never sample the stop token: each generation runs 150 tokens",
    }
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
