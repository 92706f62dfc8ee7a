"""How often a random-weight T3 samples its stop token: 40 seeds x 500 tokens per model source,
the static step, one thread. The workbench caps every generation because this is rare, not
because it cannot happen; the rate measured here is quoted on the docs' overview.

    python scripts/stop_rate.py tiny turbo-tiny
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from tts_workbench.models.reference import make_reference_wav
from tts_workbench.models.sources import load_model
from tts_workbench.runtime.decode import DecodePlan, t3_decode, text_tokens
from tts_workbench.runtime.generation import prepare_voice

SEEDS, TOKENS = 40, 500


def main(sources: list[str]) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:  # the voice, removed after the run
        reference = str(make_reference_wav(Path(tmp) / "reference.wav", seconds=6.0))
        for source in sources:
            tts = load_model(source, seed=0)
            prepare_voice(tts, reference)
            text = text_tokens(tts, "The quick brown fox jumps over the lazy dog.")
            plan = DecodePlan.plain(tts.t3, step="static")
            sampled = stops = 0
            for seed in range(SEEDS):
                generator = torch.Generator().manual_seed(seed)
                r = t3_decode(
                    tts.t3, tts.conds.t3, text, max_new_tokens=TOKENS, plan=plan, generator=generator
                )
                sampled, stops = sampled + r.steps, stops + int(r.stopped)
            print(f"{source}: {stops} stop tokens in {sampled} sampled tokens ({SEEDS} seeds, cap {TOKENS})")


if __name__ == "__main__":
    main(sys.argv[1:] or ["tiny"])
