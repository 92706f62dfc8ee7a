"""Do the compiled T3 step and the compiled CFM estimator compute what the eager ones do, on the
device at hand? The tests answer it on CPU; this script answers it on a GPU, in one run.

For a seed and ``--tokens`` tokens: upstream ``T3.inference`` vs the eager loop vs the compiled
step in float32 (tokens, first difference, largest logit difference up to it), the eager vs the
compiled step on bfloat16 copies of T3's weights, and one padded streaming window's mel frames
from the eager vs the compiled estimator (relative error). Prints JSON (``--out`` writes it too).

    python scripts/gpu_identity.py --model random --device cuda --tokens 150   # on the GPU
    .venv/bin/python scripts/gpu_identity.py --dry-run                         # here: tiny, CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tts_workbench.core.errors import CacheError, naming_flag
from tts_workbench.core.machine import environment
from tts_workbench.core.positions import positions_needed
from tts_workbench.core.quiet import quiet_libraries
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.models.sources import load_model
from tts_workbench.models.vocode import FlowPlan, flow_mels
from tts_workbench.runtime.decode import (
    DecodePlan,
    DecodeResult,
    T3Parts,
    check_positions,
    prefill_length,
    t3_decode,
    text_tokens,
)
from tts_workbench.runtime.generation import prepare_voice

TEXT = "Hello there, this is a test of the compiled decode step on a real device."
SEED = 7
CACHE = 600  # the compiled steps' static cache when the run fits (the runs measured so far)


def cache_len(tts: Any, tokens: int) -> int:
    """Static cache positions for ``tokens`` tokens of ``TEXT`` with ``tts``'s prepared voice:
    ``CACHE``, or what the run needs where that is more (a fixed cache failed ``--tokens`` past it
    only after the upstream and eager decodes had run)."""
    return max(CACHE, positions_needed(prefill_length(tts, TEXT), tokens))


def decode(tts: Any, plan: DecodePlan, tokens: int) -> tuple[DecodeResult, list[torch.Tensor]]:
    logits: list[torch.Tensor] = []
    torch.manual_seed(SEED)
    text = text_tokens(tts, TEXT)
    r = t3_decode(tts.t3, tts.conds.t3, text, max_new_tokens=tokens, plan=plan, logits_out=logits)
    return r, logits


def compare(
    ref: tuple[DecodeResult, list[torch.Tensor]], got: tuple[DecodeResult, list[torch.Tensor]]
) -> dict:
    """First differing token and the largest logit difference (relative to the step's largest
    logit) over the steps up to and including it: all had identical inputs."""
    (r0, l0), (r1, l1) = ref, got
    n = min(r0.tokens.size(1), r1.tokens.size(1))
    diff = (r0.tokens[0, :n] != r1.tokens[0, :n]).nonzero()
    first = int(diff[0, 0]) if diff.numel() else n
    rel = max(
        ((a - b).abs().max() / b.abs().max()).item()
        for a, b in zip(l1[: first + 1], l0[: first + 1], strict=False)
    )
    return {
        "same_tokens": first == n,
        "first_difference": None if first == n else first,
        "max_logit_rel_diff_up_to_it": rel,
        "step_mode": r1.step_mode,
        "ms_per_token": 1e3 * r1.step_s,
        "compile_s": r1.compile_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--dry-run", action="store_true", help="tiny model on CPU, 20 tokens")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.dry_run:
        args.model, args.device, args.tokens = "tiny", "cpu", 20
    quiet_libraries()
    t0 = time.perf_counter()
    tts = load_model(args.model, args.device, 0)
    ref = make_reference_wav(Path("runs") / "gpu_identity_reference.wav", seconds=10.0)
    prepare_voice(tts, str(ref))
    with naming_flag("--tokens", CacheError):  # past a GPT-2 backbone's positions: before any decode
        check_positions(tts.t3.tfmr.config, prefill_length(tts, TEXT), args.tokens)
    cache = cache_len(tts, args.tokens)
    out: dict[str, Any] = {"environment": environment(args.model, args.device), "tokens": args.tokens}

    torch.manual_seed(SEED)
    upstream = tts.t3.inference(
        t3_cond=tts.conds.t3, text_tokens=text_tokens(tts, TEXT), max_new_tokens=args.tokens
    )
    eager = decode(tts, DecodePlan.plain(tts.t3), args.tokens)
    out["float32_eager_equals_upstream"] = torch.equal(
        eager[0].tokens, upstream[:, : eager[0].tokens.size(1)]
    )
    out["float32_compiled_vs_eager"] = compare(
        eager, decode(tts, DecodePlan.plain(tts.t3, step="compiled", max_cache_len=cache), args.tokens)
    )
    half = T3Parts.of(tts.t3).to(torch.bfloat16)
    eager16 = decode(tts, DecodePlan(half, half), args.tokens)
    out["bfloat16_compiled_vs_eager"] = compare(
        eager16, decode(tts, DecodePlan(half, half, step="compiled", max_cache_len=cache), args.tokens)
    )

    # One regular buffered window (4 + 88 + 3 tokens), 60 of them real: the last window, padded.
    window = torch.randint(0, 6561, (1, 60), generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 80, 120, generator=torch.Generator().manual_seed(1))
    mels = {}
    for name, plan in (("eager", None), ("compiled", FlowPlan("compiled"))):
        torch.manual_seed(SEED)
        mels[name] = flow_mels(
            tts.s3gen, window, tts.conds.gen, noise=noise, plan=plan, pad_to=95 if plan else None
        )
    err = (mels["compiled"] - mels["eager"]).norm() / mels["eager"].norm()
    out["flow_compiled_padded_vs_eager_rel_err"] = err.item()
    out["wall_s"] = time.perf_counter() - t0
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
