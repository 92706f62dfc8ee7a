"""The compiled T3 step with its projections fused (q, k, v and gate, up each one matmul:
``DecodePlan(fused=True)``) against the same step unfused, side by side in one process (runs
interleaved, the first round a warm-up that compiles, not kept):

- one stream, 150 tokens, ms per token (``DecodeStats.step_s``);
- the stream engine, ``--streams`` streams at once, 150 tokens each, ms per batched step (one
  bucket of all of them, a cache of one span).

Medians over the repeats with every run kept, the ratio fused / unfused, and whether the fused
step sampled the unfused step's tokens (one stream, same seed). On a CPU, `deep-narrow` stands in
for a host-bound GPU step; on a GPU, the full-size `random` model in bfloat16 (the GPU check's
`GPU_CHECK_FUSION=1`).

    .venv/bin/python scripts/fusion_study.py --model deep-narrow > results/fusion_cpu_deep_narrow.json
    python scripts/fusion_study.py --model random --device cuda --policy bfloat16 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from tts_workbench.core.machine import environment
from tts_workbench.core.policies import NAMED_POLICIES
from tts_workbench.core.quiet import upstream_silenced
from tts_workbench.core.rng import StreamRandom
from tts_workbench.models.builders import MODELS, SIZES, build_model
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.runtime.decode import DecodePlan, t3_decode, text_tokens
from tts_workbench.runtime.engine import NOTHING_TO_FUSE, StreamEngine
from tts_workbench.runtime.generation import prepare_voice
from tts_workbench.runtime.optimized import decode_plan
from tts_workbench.studies.bench import engine_step_ms
from tts_workbench.studies.load import cache_positions

TEXT = "The quick brown fox jumps over the lazy dog."
TOKENS = 150
NAMES = ("unfused", "fused")


def _plans(tts: Any, policy: str) -> dict[str, DecodePlan]:
    """Two compiled plans over one copy of the decode weights, the second with fused projections."""
    base = dataclasses.replace(decode_plan(tts, policy), step="compiled")
    return {name: dataclasses.replace(base, fused=name == "fused") for name in NAMES}


def _one_stream(
    tts: Any, plans: dict[str, DecodePlan], tokens: dict[str, list[int]]
) -> dict[str, Callable[[], float]]:
    ids = text_tokens(tts, TEXT)

    def run(name: str) -> float:
        r = t3_decode(tts.t3, tts.conds.t3, ids, max_new_tokens=TOKENS, plan=plans[name],
                      generator=StreamRandom(0).generator(tts.device))  # fmt: skip
        tokens[name] = r.tokens[0].tolist()
        return r.step_s * 1e3

    return {name: functools.partial(run, name) for name in NAMES}


def _engine(
    tts: Any, plans: dict[str, DecodePlan], streams: int, stack: ExitStack
) -> dict[str, Callable[[], float]]:
    # One engine per plan for every round (each new engine compiles its step anew), with one
    # bucket of all the streams and a cache just long enough (one span): two compiles in all.
    cache = cache_positions(tts, [TEXT], TOKENS)
    engines = {
        name: stack.enter_context(
            StreamEngine(
                tts,
                max_streams=streams,
                step="compiled",
                plan=plan,
                max_cache_len=cache,
                step_buckets=[streams],
            )  # fmt: skip
        )
        for name, plan in plans.items()
    }
    return {
        name: functools.partial(engine_step_ms, engine, TEXT, streams, TOKENS)
        for name, engine in engines.items()
    }


def _measure(what: str, runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, Any]:
    ms: dict[str, list[float]] = {name: [] for name in runs}
    for k in range(repeats + 1):  # the first round warms up (compiles) and is not kept
        for name, run in runs.items():
            value = run()
            print(
                f"{what}: round {k}{' (warm-up)' if k == 0 else ''}, {name} {value:.2f} ms", file=sys.stderr
            )
            if k:
                ms[name].append(value)
    med = {name: statistics.median(v) for name, v in ms.items()}
    return {"ms": ms, "median_ms": med, "fused_over_unfused": med["fused"] / med["unfused"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deep-narrow", choices=SIZES, help="a size (default deep-narrow)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--policy",
        default="float32",
        choices=NAMED_POLICIES,
        help="the dtype policy of the decode weights (default float32)",
    )
    ap.add_argument("--streams", type=int, default=4, help="streams in the engine run (default 4)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for flag, value in (("--repeats", args.repeats), ("--streams", args.streams)):  # a kept round; a stream
        if value < 1:
            ap.error(f"{flag} must be at least 1, got {value}")
    if MODELS[args.model][0] == "turbo":  # as bench refuses --fused on Turbo, before the build
        ap.error(f"argument --model: {args.model}: {NOTHING_TO_FUSE}: give a Standard or Multilingual size")
    torch.manual_seed(0)
    # upstream's prints would land in the JSON on stdout; the voice is removed once read
    with upstream_silenced(), tempfile.TemporaryDirectory() as tmp:
        tts = build_model(args.model, device=args.device)
        prepare_voice(tts, str(make_reference_wav(Path(tmp) / "reference.wav")))
    plans = _plans(tts, args.policy)
    tokens: dict[str, list[int]] = {}
    one = _measure("one stream", _one_stream(tts, plans, tokens), args.repeats)
    with ExitStack() as stack:
        engines = _engine(tts, plans, args.streams, stack)
        engine = _measure(f"engine, {args.streams} streams", engines, args.repeats)
    out = {
        "environment": environment(f"{args.model} (random weights)", args.device),
        "model": f"{args.model} (random weights)",
        "policy": args.policy,
        "plan": plans["fused"].describe(),
        "tokens": TOKENS,
        "repeats": args.repeats,
        "one_stream_compiled": {**one, "same_tokens": tokens["fused"] == tokens["unfused"]},
        f"engine_{args.streams}_streams_compiled": engine,
    }
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
