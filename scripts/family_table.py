"""The family table of docs/measurements.md ("Model families side by side") from one
``tts-workbench bench`` run per family (bench.json files).

    for m in random turbo-random multilingual-random; do
      tts-workbench bench --model $m --configs upstream,optimized,upstream-stream,optimized-stream \\
        --tokens 50 --repeats 1 --dtype decode-bfloat16 --out runs/family/$m
    done
    python scripts/family_table.py runs/family/*/bench.json
"""

from __future__ import annotations

import json
import sys

import pandas as pd

from tts_workbench.core.tables import render

FAMILY = {"random": "standard", "turbo-random": "turbo", "multilingual-random": "multilingual"}


def row(report: dict) -> dict:
    by = {s["config"]: s for s in report["summary"]}
    up, opt, stream = by["upstream"], by["optimized"], by["optimized-stream"]
    return {
        "family": FAMILY.get(report["environment"]["model"], report["environment"]["model"]),
        "t3_step_params_m": report["floors"]["upstream"]["t3_bytes"]
        / 4
        / 1e6,  # the weights one decode step reads, float32
        "t3_ms_per_tok_upstream": 1e3 * up["t3_step_s_median"],
        "t3_ms_per_tok_optimized": 1e3 * opt["t3_step_s_median"],
        "s3gen_s_per_call": up["s3gen_s_median"] / up["s3gen_calls"],
        "s3gen_s_per_audio_s": up["s3gen_s_median"] / up["audio_s"],
        "t3_share_pct": 100
        * up["t3_step_s_median"]
        * 25
        / (up["t3_step_s_median"] * 25 + up["s3gen_s_median"] / up["audio_s"]),
        "buffered_calls": stream["s3gen_calls"],
        "buffered_ttfa_s": stream["ttfa_s_median"],
        "buffered_rtf": stream["rtf_median"],
    }


if __name__ == "__main__":
    frame = pd.DataFrame([row(json.load(open(p))) for p in sys.argv[1:]])
    print(
        render(
            frame,
            {
                "t3_step_params_m": ".0f",
                "t3_ms_per_tok_upstream": ".0f",
                "t3_ms_per_tok_optimized": ".0f",
                "t3_share_pct": ".0f",
                "s3gen_s_per_call": ".1f",
                "s3gen_s_per_audio_s": ".1f",
            },
        )
    )
