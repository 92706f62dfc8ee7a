"""In-process engine vs HTTP (one replica) vs HTTP (two replicas), same streams, one run: the
"Serving and scaling out" table (issue 20's targets). Runs the real commands: `load` in this
machine's process, then `serve` (stopped by SIGTERM) measured with `load --url`. One thread per
engine (OMP_NUM_THREADS=1, --threads 1): two replicas use the two cores of this machine, while
the load client and Ray's proxy share them too.

    .venv/bin/python scripts/serving_study.py [--tokens 100] > results/serving_cpu_tiny.json

(The committed results/serving_cpu_tiny.json was written by an earlier version of this script: it
has machine and date where the script now writes environment.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray

from tts_workbench.core.machine import environment
from tts_workbench.core.ports import free_port
from tts_workbench.instruments.profiling import start_server

CLI = [sys.executable, "-m", "tts_workbench.interface.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _load(args: list[str], out: Path) -> dict[str, Any]:
    """Run ``load ARGS`` into ``out``; its report. Its stdout would land in this script's JSON."""
    p = subprocess.run([*CLI, "load", *args, "--out", str(out), "--json"], env=ENV,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    if p.returncode:
        raise RuntimeError(f"`load {' '.join(args)}` exited with code {p.returncode}: {p.stderr[-2000:]}")
    return json.loads((out / "load.json").read_text())


def _loads(levels: list[int], args: list[str], out: Path) -> dict[str, Any]:
    """``load`` once per level, in order, as one report: the first run's fields, every run's levels.
    The load study refuses a level given twice (since 2026-12-03; this script's default, three
    single streams, was refused from then until 2026-12-07): each single stream is a run of its own."""
    reports = [_load(["--streams", str(n), *args], out / f"level{k}") for k, n in enumerate(levels)]
    seen = sorted({replica for r in reports for replica in r.get("replicas_seen", [])})
    return {**reports[0], "levels": [lv for r in reports for lv in r["levels"]], "replicas_seen": seen}


def _served(replicas: int, levels: list[int], load_args: list[str], out: Path, cache: int) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*CLI, "serve", "--port", str(port), "--replicas", str(replicas), "--threads", "1",
           "--max-cache-len", str(cache), "--max-input-chars", "200", "--out", str(out / "run")]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    # start_server waits for /health while the server runs (the replicas build and warm up): a
    # server that exits is reported at once, with the tail of its log.
    with open(out / "server.log", "w+b") as log:
        server = start_server(cmd, url, log, ready="/health", timeout=300, env=ENV).process
        try:
            return _loads(levels, [*load_args, "--url", url], out)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()  # and Ray with it: `ray stop` cleans up what it leaves
                server.wait()


def _row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    singles = [lv["summary"] for lv in report["levels"] if lv["streams"] == 1]
    many = [lv["summary"] for lv in report["levels"] if lv["streams"] > 1][-1]
    return {
        "setup": name,
        "one_stream_ttfa_s": sorted(s["ttfa_p50_s"] for s in singles),
        "one_stream_ttfa_median_s": statistics.median(s["ttfa_p50_s"] for s in singles),
        "streams": many["streams"],
        "ttfa_p50_s": many["ttfa_p50_s"],
        "ttfa_p95_s": many["ttfa_p95_s"],
        "worst_underrun_s": many["worst_underrun_s"],
        "audio_per_wall_s": many["audio_per_wall_s"],
        "replicas_seen": len(report.get("replicas_seen", [])) or None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="100")
    ap.add_argument("--streams", default="1,1,1,4")
    args = ap.parse_args()
    # The table reads the single streams' TTFA (their median) and the last level above 1: without
    # both the run would fail only at its end, after three setups' worth of load.
    try:
        levels = [int(x) for x in args.streams.split(",")]
    except ValueError:
        ap.error(f"--streams takes levels separated by commas, such as 1,1,1,4: got {args.streams!r}")
    if 1 not in levels or max(levels) == 1:
        ap.error(f"--streams needs the level 1 and one above 1, such as 1,1,1,4: got {args.streams!r}")
    load_args = ["--tokens", args.tokens]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        inproc = _loads(levels, load_args, t / "inproc")
        cache = inproc["max_cache_len"]  # the servers' caches as long: a step attends over all of it
        reports = {
            "in-process engine": inproc,
            "HTTP, 1 replica": _served(1, levels, load_args, t / "http1", cache),
            "HTTP, 2 replicas": _served(2, levels, load_args, t / "http2", cache),
        }
    rows = [_row(name, r) for name, r in reports.items()]
    base, one, two = rows
    print(json.dumps({
        "what": "tiny model, CPU, one torch thread per engine; the same texts and seeds in each setup; "
                f"levels {args.streams} (three single streams give the one-stream TTFA spread), "
                f"{args.tokens} tokens per stream; measured by the load study (in process) and by its HTTP "
                "client (from the bytes' arrival)",
        "environment": {**environment("tiny", "cpu"), "ray": ray.__version__},
        "rows": rows,
        "http_ttfa_overhead_ms": 1000 * (one["one_stream_ttfa_median_s"] - base["one_stream_ttfa_median_s"]),
        "two_replicas_over_one_audio_per_wall": two["audio_per_wall_s"] / one["audio_per_wall_s"],
        "two_replicas_over_one_ttfa_p95": two["ttfa_p95_s"] / one["ttfa_p95_s"],
        "reports": reports,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
