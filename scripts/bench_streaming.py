"""Naive vs buffered streaming on the same tokens, with the one-shot S3Gen call as the yardstick.

Usage: .venv/bin/python scripts/bench_streaming.py [--model random] [--tokens 250] [--out results/...]
Writes a JSON file and prints the table (quoted in docs/measurements.md).
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

from tts_workbench.core.machine import environment
from tts_workbench.core.policies import NAMED_POLICIES
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.models.sources import load_model
from tts_workbench.runtime.generation import prepare_voice
from tts_workbench.runtime.optimized import decode_plan
from tts_workbench.runtime.streaming import StreamConfig
from tts_workbench.studies.bench import compare_streaming, format_streaming

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--model", default="tiny")
p.add_argument("--tokens", type=int, default=250)
p.add_argument(
    "--decode",
    default="decode-bfloat16",
    choices=NAMED_POLICIES,
    help="T3 dtype policy (same for every strategy)",
)
p.add_argument("--out", default="runs/bench_streaming.json")
args = p.parse_args()
with contextlib.redirect_stdout(sys.stderr):
    tts = load_model(args.model)
    prepare_voice(tts, str(make_reference_wav(Path("runs") / "reference_10s.wav", seconds=10)))
    configs = {
        "naive (25/50)": StreamConfig("naive"),
        "buffered 1+3.5 s": StreamConfig("buffered"),
        "buffered, prompt 3 s": StreamConfig("buffered", prompt_s=3.0),
    }
    rows = compare_streaming(tts, configs, tokens=args.tokens, plan=decode_plan(tts, args.decode))
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(
    json.dumps(
        {
            "environment": environment(args.model, "cpu"),
            "tokens": args.tokens,
            "t3_policy": args.decode,
            "rows": rows,
        },
        indent=2,
        default=str,
    )
)
print(format_streaming(rows))
