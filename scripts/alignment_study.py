"""What upstream's alignment analyzer costs Multilingual streams in the stream engine: its static
step with ``alignment=True`` (eager attention with the weights returned, each stream's analyzer
fed its rows: three heads' weights copied to the host per stream and step) against the same
step without it, side by side in one process (engines interleaved, the first round a warm-up,
not kept). ms per batched step at each ``--streams`` level, medians over the repeats with every
run kept, and the ratio with / without.

    .venv/bin/python scripts/alignment_study.py > results/alignment_cpu_multilingual_tiny.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch

from tts_workbench.core.errors import ConfigError
from tts_workbench.core.machine import environment
from tts_workbench.core.quiet import upstream_silenced
from tts_workbench.interface import flags
from tts_workbench.models.builders import MODELS, build_model
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.runtime.engine import StreamEngine
from tts_workbench.runtime.generation import prepare_voice
from tts_workbench.studies.bench import engine_step_ms
from tts_workbench.studies.load import cache_positions

TEXT = "The quick brown fox jumps over the lazy dog."
NAMES = ("without", "with")
# the analyzer is Multilingual T3's: the others' engines refuse alignment=True
SIZES = [size for size, (family, _) in MODELS.items() if family == "multilingual"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default="multilingual-tiny",
        choices=SIZES,
        help="a Multilingual size (default %(default)s)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--streams", type=flags.levels, default="1,4", help="levels, comma list (default 1,4)")
    ap.add_argument("--tokens", type=int, default=100, help="tokens per stream (default 100)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for flag, value in (("--repeats", args.repeats), ("--tokens", args.tokens)):
        if value < 1:
            ap.error(f"{flag} must be at least 1, got {value}")
    levels: list[int] = list(args.streams)
    torch.manual_seed(0)
    # upstream's prints would land in the JSON on stdout; the voice is removed once read
    with upstream_silenced(), tempfile.TemporaryDirectory() as tmp:
        tts = build_model(args.model, device=args.device)
        prepare_voice(tts, str(make_reference_wav(Path(tmp) / "reference.wav")))
    try:
        cache = cache_positions(tts, [TEXT], args.tokens)
    except ConfigError as e:  # --tokens past the engine's largest cache, and what fits
        ap.error(str(e))
    results = {}
    for n in levels:
        ms: dict[str, list[float]] = {name: [] for name in NAMES}
        with ExitStack() as stack:  # each engine built is closed, should the next fail to start
            engines = {
                name: stack.enter_context(
                    StreamEngine(tts, max_streams=n, max_cache_len=cache, alignment=name == "with")
                )
                for name in NAMES
            }
            for k in range(args.repeats + 1):  # the first round warms up and is not kept
                for name, engine in engines.items():
                    value = engine_step_ms(engine, TEXT, n, args.tokens)
                    print(f"{n} streams, round {k}, {name} {value:.2f} ms per step", file=sys.stderr)
                    if k:
                        ms[name].append(value)
        med = {name: statistics.median(v) for name, v in ms.items()}
        results[f"{n}_streams"] = {
            "ms": ms,
            "median_ms": med,
            "with_over_without": med["with"] / med["without"],
        }
    json.dump(
        {
            "environment": environment(f"{args.model} (random weights)", args.device),
            "step": "static",
            "tokens": args.tokens,
            "repeats": args.repeats,
            "levels": results,
        },
        sys.stdout,
        indent=1,
    )
    print()


if __name__ == "__main__":
    main()
