"""200 streams in a row through one stream engine, every fifth failing on purpose (empty text):
every cache row is free at the end and resident memory stays flat (issue 19's soak target).

    .venv/bin/python scripts/engine_soak.py [--streams 200] [--tokens 8] > results/engine_soak_cpu.json

(The committed results/engine_soak_cpu.json was written by an earlier version of this script: it has
rss_mb_after_streams where the script now writes rss_mib_after_streams, and no environment.)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

from tts_workbench.core.quiet import quiet_libraries, upstream_silenced

quiet_libraries()
from tts_workbench.core.errors import EmptyTextError  # noqa: E402
from tts_workbench.core.machine import environment  # noqa: E402
from tts_workbench.instruments.memory import rss_bytes  # noqa: E402
from tts_workbench.models.reference import make_reference_wav  # noqa: E402
from tts_workbench.models.sources import load_model  # noqa: E402
from tts_workbench.runtime.engine import StreamEngine  # noqa: E402
from tts_workbench.runtime.generation import prepare_voice  # noqa: E402
from tts_workbench.runtime.streaming import StreamConfig  # noqa: E402
from tts_workbench.studies.load import DEFAULT_TEXTS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    with upstream_silenced():  # stdout is the result's JSON
        tts = load_model("tiny")
        prepare_voice(tts, str(make_reference_wav("runs/soak/reference.wav")))
    config = StreamConfig("buffered", first_window_s=0.4, window_s=0.8)
    ok = failed = 0
    rss_mib: dict[int, float] = {}
    t0 = time.perf_counter()
    with StreamEngine(tts, max_streams=8, config=config) as engine:
        handles = [
            engine.submit("" if k % 5 == 4 else DEFAULT_TEXTS[k % 4], seed=k, max_new_tokens=args.tokens)
            for k in range(args.streams)
        ]
        for k, h in enumerate(handles, start=1):
            try:
                ok += bool([c for c, _ in h])
            except EmptyTextError:
                failed += 1
            if k in (args.streams // 4, args.streams // 2, args.streams):
                gc.collect()
                rss_mib[k] = rss_bytes() / 2**20
            print(f"\r{k}/{args.streams}", end="", file=sys.stderr)
        free, rows = engine.free_rows(), engine.max_streams * engine.rows_per_stream
        active, queued = engine.active(), engine.queued()
    print(file=sys.stderr)
    print(json.dumps({
        "what": "scripts/engine_soak.py: streams in a row through one engine (tiny model, CPU)",
        "environment": environment("tiny", "cpu"),
        "streams": args.streams, "tokens": args.tokens, "ok": ok, "failed_on_purpose": failed,
        "free_rows_at_end": free, "rows": rows, "active_at_end": active, "queued_at_end": queued,
        "rss_mib_after_streams": rss_mib, "wall_s": time.perf_counter() - t0,
        "engine": engine.stats.to_dict(),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
