"""Sampling B streams' next tokens: upstream's way, one stream at a time (transformers'
processors over the ids so far, then `torch.multinomial`, which reads a check back to the host
every call), vs `sampling.Sampler` (the same processors batched over the streams, the penalty over
a mask, one `exponential_` draw per stream, no host read). Side by side in one process, same
logits; the tokens are checked equal first. Speech vocabulary (8194), two rows per stream.

Then the processors alone as the compiled step runs them (`torch.compile`, one stream's guided
row, `generate`'s settings: min-p 0.05, top-p 1.0): transformers' `MinPLogitsWarper` and
`TopPLogitsWarper` as upstream builds them, against `Sampler`'s (min-p without its `topk`,
top-p left out at 1); their probabilities checked equal first.

    .venv/bin/python scripts/sampling_study.py [--device cpu] > results/sampling_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils import benchmark
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopPLogitsWarper,
)

from tts_workbench.core.machine import environment
from tts_workbench.runtime.sampling import Sampler, penalize

VOCAB, START, HISTORY = 8194, 6561, 100


def _level(b: int, device: torch.device, min_run_time: float) -> list[dict[str, object]]:
    """Both ways for ``b`` streams, on the same logits and history; their tokens checked equal."""
    sampler = Sampler(turbo=False)
    upstream = (RepetitionPenaltyLogitsProcessor(1.2), MinPLogitsWarper(0.05), TopPLogitsWarper(0.95))
    logits = torch.randn(2 * b, VOCAB, device=device) * 4
    ids = torch.randint(0, START, (b, HISTORY), device=device)
    ids[:, 0] = START
    seen = torch.zeros(b, VOCAB, dtype=torch.bool, device=device).scatter_(1, ids, True)

    def one_by_one(seed: int) -> torch.Tensor:
        out = []
        for k in range(b):
            cond, uncond = logits[2 * k : 2 * k + 1], logits[2 * k + 1 : 2 * k + 2]
            x = upstream[0](ids[k : k + 1], cond + 0.5 * (cond - uncond)) / 0.8
            x = upstream[2](None, upstream[1](None, x))
            g = torch.Generator(device).manual_seed(seed + k)
            out.append(torch.multinomial(torch.softmax(x, dim=-1), 1, generator=g))
        return torch.cat(out)

    def batched(seed: int) -> torch.Tensor:
        gens = [torch.Generator(device).manual_seed(seed + k) for k in range(b)]
        return sampler.sample(logits, seen, gens)[0]  # the tokens (the finiteness flag apart)

    assert all(torch.equal(one_by_one(s), batched(s)) for s in range(5)), "tokens differ"
    rows: list[dict[str, object]] = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, fn in (("upstream, one stream at a time", one_by_one), ("Sampler, batched", batched)):
        # The Timer runs with num_threads threads, 1 unless given: the process's own, which the
        # results record (a file without "timer_threads" was timed with one thread).
        timer = benchmark.Timer(
            "fn(0); sync()", globals={"fn": fn, "sync": sync}, num_threads=torch.get_num_threads()
        )
        m = timer.blocked_autorange(min_run_time=min_run_time)
        rows.append({"streams": b, "how": name, "median_ms": m.median * 1e3, "iqr_ms": m.iqr * 1e3})
    return rows


def _processors(device: torch.device, min_run_time: float) -> list[dict[str, object]]:
    """Upstream's min-p and top-p (1.0) against ``Sampler``'s, each compiled, on one row."""
    x = torch.randn(1, VOCAB, device=device) * 4
    seen = torch.zeros(1, VOCAB, dtype=torch.bool, device=device)
    seen[0, torch.randint(0, START, (HISTORY,))] = True
    upstream = (MinPLogitsWarper(0.05), TopPLogitsWarper(1.0))
    mine = Sampler(turbo=False, top_p=1.0)  # the same penalty and temperature before both

    def theirs(v: torch.Tensor) -> torch.Tensor:
        return upstream[1](None, upstream[0](None, penalize(seen, v, 1.2) / 0.8))

    ways = {
        "transformers' min-p and top-p": torch.compile(theirs),
        "Sampler's (no topk, no top-p at 1)": torch.compile(lambda v: mine.scores(seen, v)),
    }
    probs = [torch.softmax(fn(x), dim=-1) for fn in ways.values()]
    assert torch.equal(probs[0], probs[1]), "probabilities differ"
    rows: list[dict[str, object]] = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, fn in ways.items():
        timer = benchmark.Timer(
            "fn(x); sync()", globals={"fn": fn, "x": x, "sync": sync}, num_threads=torch.get_num_threads()
        )
        m = timer.blocked_autorange(min_run_time=min_run_time)
        rows.append({"processors": name, "median_ms": m.median * 1e3, "iqr_ms": m.iqr * 1e3})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds timed per way and level")
    args = ap.parse_args()
    device = torch.device(args.device)
    levels = [int(x) for x in args.streams.split(",")]
    rows = [row for b in levels for row in _level(b, device, args.min_run_time)]
    ms = {(r["streams"], str(r["how"]).split(",")[0]): float(r["median_ms"]) for r in rows}  # type: ignore[arg-type]
    out = {
        "environment": environment("none (random logits)", str(device)),
        "timer_threads": torch.get_num_threads(),  # the threads every Timer below ran with
        "min_run_time": args.min_run_time,  # the seconds each way was timed for, at each level
        "rows": rows,
        "batched_over_one_by_one": {b: ms[b, "Sampler"] / ms[b, "upstream"] for b in levels},
        "compiled_processors": _processors(device, args.min_run_time),
    }
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
