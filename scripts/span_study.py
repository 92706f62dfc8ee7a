"""The T3 step attending to a span of its static cache vs to the whole cache, side by side in one
process (runs interleaved), on `deep-narrow`, where reading the cache is a large part of a step:

- one stream, compiled step, the wrapper's default cache (1536 positions), 150 tokens;
- the stream engine, 8 streams, static step, a 1024-position cache (the `serve` default);
- the stream engine, 4 streams, compiled step, a 512-position cache (the engine's default).

The baseline is the behaviour before spans: `decode.MIN_SPAN` at the cache's length gives one
span, the whole cache. Medians over the repeats, with the spread.

    .venv/bin/python scripts/span_study.py [--repeats 5] > results/span_cpu_deep_narrow.json

(The committed results/span_cpu_deep_narrow.json was written by an earlier version of this script:
it has device and versions where the script now writes environment.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tts_workbench.core.machine import environment
from tts_workbench.core.quiet import upstream_silenced
from tts_workbench.core.rng import StreamRandom
from tts_workbench.models.builders import build_model
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.runtime import decode
from tts_workbench.runtime.decode import DecodePlan, t3_decode, text_tokens
from tts_workbench.runtime.engine import StreamEngine
from tts_workbench.runtime.generation import prepare_voice
from tts_workbench.studies.bench import engine_step_ms

TEXT = "The quick brown fox jumps over the lazy dog."
TOKENS = 150
WHOLE = 10**9  # MIN_SPAN beyond any cache: one span, the whole cache


def _one_stream(tts: Any) -> dict[str, Callable[[], float]]:
    ids = text_tokens(tts, TEXT)
    plans = {name: DecodePlan.plain(tts.t3, step="compiled") for name in ("span", "whole")}

    def run(name: str) -> float:
        r = t3_decode(tts.t3, tts.conds.t3, ids, max_new_tokens=TOKENS, plan=plans[name],
                      generator=StreamRandom(0).generator())  # fmt: skip
        return r.step_s * 1e3

    return {name: partial(run, name) for name in plans}


def _engine(tts: Any, streams: int, step: str, cache: int) -> dict[str, Callable[[], float]]:
    def run() -> float:
        with StreamEngine(tts, max_streams=streams, step=step, max_cache_len=cache) as engine:
            return engine_step_ms(engine, TEXT, streams, TOKENS)

    return {"span": run, "whole": run}


def _measure(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, Any]:
    ms: dict[str, list[float]] = {name: [] for name in runs}
    default = decode.MIN_SPAN
    try:
        for k in range(repeats + 1):  # the first round warms up (compiles) and is not kept
            for name, run in runs.items():
                decode.MIN_SPAN = WHOLE if name == "whole" else default
                value = run()
                if k:
                    ms[name].append(value)
    finally:
        decode.MIN_SPAN = default
    med = {name: statistics.median(v) for name, v in ms.items()}
    return {
        "ms_per_step": ms,
        "median_ms_per_step": med,
        "span_over_whole": med["span"] / med["whole"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.repeats < 1:  # the medians need one kept round (the first only warms up)
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    torch.manual_seed(0)
    # upstream's prints would land in the JSON on stdout; the voice is removed once read
    with upstream_silenced(), tempfile.TemporaryDirectory() as tmp:
        tts = build_model("deep-narrow")
        prepare_voice(tts, str(make_reference_wav(Path(tmp) / "reference.wav")))
    out = {
        "environment": environment("deep-narrow (random weights)", "cpu"),
        "model": "deep-narrow (random weights)",
        "tokens": TOKENS,
        "repeats": args.repeats,
        "one_stream_compiled_cache_1536": _measure(_one_stream(tts), args.repeats),
        "engine_8_streams_static_cache_1024": _measure(_engine(tts, 8, "static", 1024), args.repeats),
        "engine_4_streams_compiled_cache_512": _measure(_engine(tts, 4, "compiled", 512), args.repeats),
    }
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
