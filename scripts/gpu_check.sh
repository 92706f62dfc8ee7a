#!/usr/bin/env bash
# The one prepared GPU check (issues 7 and 13; scripts/gpu_identity.py checks the compiled paths'
# tokens and frames against the eager ones on the same machine). On an offline machine with an
# NVIDIA GPU and the image's CUDA PyTorch: install the carried wheels (scripts/prepare_gpu_wheels.sh), then
#   1. bench upstream (float32, as it loads) vs the optimized wrapper with the eager, static-cache
#      and compiled (CUDA graphs) decode step, one-shot and streaming (naive vs buffered, eager vs
#      compiled), on the full-size random model, for each dtype policy asked (default bfloat16
#      only, so the set fits one 10-minute call), recording the attention kernel that ran, T3 ms
#      per token, compile time, peak CUDA memory, TTFA and RTF;
#   2. sampling the next tokens of 1, 8, 32 and 64 streams: upstream's way one stream at a time
#      vs decode.Sampler batched (scripts/sampling_study.py, ~30 s);
#   2b. (GPU_CHECK_MULTILINGUAL=1) the same bench on the Multilingual model (bfloat16; its static and
#      compiled steps decode without the alignment analyzer, README);
#   3. (GPU_CHECK_DIAGNOSE=1) the diagnosis on CUDA: which SDPA kernel upstream's float32 decode
#      ran, why Flash was refused, and where a float16 cast breaks;
#   4. (GPU_CHECK_TRACE=1, the default) `tts-workbench trace`: T3's decode with the eager and the
#      compiled step profiled after a warm-up, each one's t3.decode region (its first 20 steps)
#      cut and copied to results/traces/ (issue 22); the image has no HolisticTraceAnalysis (and
#      its plotly would not fit the carried wheels), so they are read back here:
#      tts-workbench trace --read results/traces/decode_*.json.gz
# Each step runs on its own with a time limit: one that fails or runs out is recorded with the
# end of its stderr and the next one still runs. Everything lands in one results file.
#
#   scripts/gpu_check.sh            # on the GPU machine; on an H200 the default set (6 configs,
#                                   # bfloat16, both compiles included) took 305 s: one call
#   scripts/gpu_check.sh --dry-run  # here, on CPU: tiny model, a few tokens, no install (a test runs this)
#   GPU_CHECK_POLICIES="bfloat16 float16"  # the policies (default: bfloat16; "" for none)
#   GPU_CHECK_DIAGNOSE=1            # also run the diagnosis step (default: skipped)
#   GPU_CHECK_MULTILINGUAL=1        # also bench the Multilingual model (configs GPU_CHECK_MULTILINGUAL_CONFIGS,
#                                   # default upstream,optimized,compiled,optimized-stream,compiled-stream)
#   GPU_CHECK_LOAD=1                # also run the load study (issue 19): the stream engine with the
#                                   # compiled step, T3 in bfloat16, levels GPU_CHECK_LOAD_LEVELS
#                                   # (default 1,8,32,64; dry run 1,2); alone, GPU_CHECK_POLICIES=""
#   GPU_CHECK_SERVE=1               # also serve one replica (compiled, T3 bfloat16) and send the load
#                                   # study's levels to it with `load --url` (issue 20's GPU row)
#   GPU_CHECK_DIR=DIR               # where each step's raw JSON and stderr go (default runs/gpu_check)
#   GPU_CHECK_REFERENCE=WAV         # dry run: the voice to use (default: a generated 2 s one)
#   scripts/gpu_check.sh --combine  # only write the results file from GPU_CHECK_DIR's steps (and GPU_CHECK_NOTE)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0; [[ "${1:-}" == "--dry-run" ]] && DRY=1
COMBINE=0; [[ "${1:-}" == "--combine" ]] && COMBINE=1 && DRY=2
OUT=${GPU_CHECK_OUT:-results/gpu_check.json}
DIR=${GPU_CHECK_DIR:-runs/gpu_check}
CONFIGS=${GPU_CHECK_CONFIGS:-upstream,optimized,static,compiled,optimized-stream,compiled-stream}
if [[ $DRY != 0 ]]; then
    PY=${PYTHON:-.venv/bin/python}; MODEL=tiny; MULTILINGUAL=multilingual-tiny; DEVICE=cpu; TOKENS=8; REPEATS=1; WARMUP=0; LIMIT=300
else
    # The image's python3 is itself a venv holding CUDA torch: install the carried wheels into a
    # folder that PYTHONPATH puts ahead of it (transformers 5.2.0 then shadows the image's newer one).
    PY=python3
    $PY -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target /tmp/site gpu-wheels/*.whl || exit 1
    # The package runs from the checkout (the image's Python is 3.12; pyproject pins 3.11 for CI).
    export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1
    MODEL=random; MULTILINGUAL=multilingual-random; DEVICE=cuda; TOKENS=${GPU_CHECK_TOKENS:-150}; REPEATS=2; WARMUP=1; LIMIT=${GPU_CHECK_STEP_LIMIT:-540}
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >&2
fi
mkdir -p "$DIR"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
REF=()
if [[ $DRY == 1 ]]; then  # a 2 s voice keeps the dry run short (S3Gen re-encodes the prompt every call)
    REF=(--reference "${GPU_CHECK_REFERENCE:-$TMP/ref.wav}")  # a caller's own saves a process start
    [[ -n ${GPU_CHECK_REFERENCE:-} ]] || $PY -c "import sys; from tts_workbench.models.sources import make_reference_wav; make_reference_wav(sys.argv[1], seconds=2)" "$TMP/ref.wav"
fi

# A step that has printed its whole report but does not exit is stopped EXIT_GRACE s later: at
# exit, Inductor waits up to 300 s for its compile-worker process (pytorch/pytorch#162199), and
# the Turbo run of 2026-11-28 sat past its call's limit after its report was complete.
EXIT_GRACE=${GPU_CHECK_EXIT_GRACE:-30}
step() {  # step NAME COMMAND...: stdout to DIR/NAME.json, stderr to DIR/NAME.err, never fatal
    local name=$1; shift
    echo "== $name" >&2
    local t0=$SECONDS done_at=""
    : > "$DIR/$name.json"  # no report of an earlier run taken for this one's
    timeout -k 15 "$LIMIT" "$@" "${REF[@]}" --json > "$DIR/$name.json" 2> "$DIR/$name.err" &
    local pid=$!
    while kill -0 $pid 2>/dev/null; do
        if [[ -z $done_at && -s "$DIR/$name.json" ]] \
            && $PY -c 'import json, sys; json.load(open(sys.argv[1]))' "$DIR/$name.json" 2>/dev/null; then
            done_at=$SECONDS
        elif [[ -n $done_at ]] && (( SECONDS - done_at > EXIT_GRACE )); then
            echo "   its report is complete but it has not exited ${EXIT_GRACE} s later: stopped" >&2
            kill -TERM $pid
            break
        fi
        sleep 1
    done
    wait $pid
    local rc=$?
    echo "   rc $rc in $((SECONDS - t0)) s" >&2
    [[ $rc == 0 || -n $done_at ]] || tail -5 "$DIR/$name.err" >&2  # a stopped step's report is whole
}

POLICIES=${GPU_CHECK_POLICIES-bfloat16}
[[ $COMBINE == 1 ]] && POLICIES_RUN="" || POLICIES_RUN=$POLICIES
for policy in $POLICIES_RUN; do
    step "bench-$policy" $PY -m tts_workbench.interface.cli bench --model $MODEL --device $DEVICE --tokens $TOKENS \
        --repeats $REPEATS --warmup $WARMUP --configs "$CONFIGS" --dtype "$policy" --out "$TMP/$policy"
done
if [[ $COMBINE != 1 && ${GPU_CHECK_MULTILINGUAL:-0} == 1 ]]; then
    step bench-multilingual $PY -m tts_workbench.interface.cli bench --model $MULTILINGUAL --device $DEVICE \
        --tokens $TOKENS --repeats $REPEATS --warmup $WARMUP --dtype bfloat16 --out "$TMP/multilingual" \
        --configs "${GPU_CHECK_MULTILINGUAL_CONFIGS:-upstream,optimized,compiled,optimized-stream,compiled-stream}"
fi
if [[ $COMBINE != 1 && ${GPU_CHECK_LOAD:-0} == 1 ]]; then
    [[ $DRY == 1 ]] && LEVELS=${GPU_CHECK_LOAD_LEVELS:-1,2} || LEVELS=${GPU_CHECK_LOAD_LEVELS:-1,8,32,64}
    step load $PY -m tts_workbench.interface.cli load --model $MODEL --device $DEVICE --tokens $TOKENS \
        --streams "$LEVELS" --decode compiled --dtype bfloat16 --out "$TMP/load"
fi
if [[ $COMBINE != 1 && ${GPU_CHECK_SERVE:-0} == 1 ]]; then  # the same streams over HTTP (issue 20)
    [[ $DRY == 1 ]] && LEVELS=${GPU_CHECK_LOAD_LEVELS:-1,2} || LEVELS=${GPU_CHECK_LOAD_LEVELS:-1,8,32,64}
    PORT=${GPU_CHECK_PORT:-8123}
    echo "== serve (one replica on a local Ray)" >&2
    $PY -m tts_workbench.interface.cli serve --model $MODEL --device $DEVICE --port $PORT --decode compiled \
        --dtype bfloat16 --max-streams 64 --max-cache-len ${GPU_CHECK_SERVE_CACHE:-320} --max-input-chars 200 --tokens $TOKENS \
        --out "$TMP/serve" > "$DIR/serve.out" 2> "$DIR/serve.err" &
    SERVER=$!
    $PY - "$PORT" "$LIMIT" "$SERVER" <<'WAIT' || tail -5 "$DIR/serve.err" >&2
import os, sys, time, urllib.request
port, limit, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(limit):  # bounded: until the replica has built, compiled and answers
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server exited")
    time.sleep(1)
sys.exit("the server did not answer in time")
WAIT
    step serve-load $PY -m tts_workbench.interface.cli load --url "http://127.0.0.1:$PORT" --tokens $TOKENS \
        --streams "$LEVELS" --out "$TMP/serve-load"
    kill -TERM $SERVER; timeout 120 tail --pid=$SERVER -f /dev/null || kill -KILL $SERVER
fi
if [[ $COMBINE != 1 ]]; then  # sampling B streams: one at a time vs decode.Sampler batched, same tokens
    echo "== sampling" >&2
    [[ $DRY == 1 ]] && SAMPLING=(--streams 2 --min-run-time 0.2) || SAMPLING=(--streams 1,8,32,64)
    timeout "$LIMIT" $PY scripts/sampling_study.py --device $DEVICE "${SAMPLING[@]}" \
        > "$DIR/sampling.json" 2> "$DIR/sampling.err" || tail -5 "$DIR/sampling.err" >&2
fi
if [[ $COMBINE != 1 && ${GPU_CHECK_TRACE:-1} == 1 ]]; then
    [[ $DRY == 1 ]] && STEPS=eager,static || STEPS=eager,compiled  # no compile in the dry run
    step trace $PY -m tts_workbench.interface.cli trace --model $MODEL --device $DEVICE --tokens $((TOKENS < 60 ? TOKENS : 60)) \
        --steps $STEPS --dtype bfloat16 --keep 20 --logdir "$DIR/traces" --cut-only
fi
[[ $COMBINE == 1 || ${GPU_CHECK_DIAGNOSE:-0} == 0 ]] || step diagnose $PY -m tts_workbench.interface.cli diagnose --model $MODEL --device $DEVICE --tokens $((TOKENS / 3 + 1)) \
    --dtype float16 --out "$TMP/diagnose"

mkdir -p "$(dirname "$OUT")"
GPU_CHECK_NOTE=${GPU_CHECK_NOTE:-} $PY - "$DIR" "$OUT" "$DRY" $POLICIES <<'PY'
import json, os, sys
from pathlib import Path
from tts_workbench.core.quiet import quiet_libraries
quiet_libraries()
from tts_workbench.studies.bench import format_bench
d, out, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"

def load(name):  # (result, None), (None, error text), or (None, None) for a step not run
    if not (d / f"{name}.json").exists() and not (d / f"{name}.err").exists():
        return None, None
    try:
        return json.loads((d / f"{name}.json").read_text()), None
    except (OSError, ValueError):
        err = (d / f"{name}.err").read_text() if (d / f"{name}.err").exists() else ""
        return None, err[-3000:] or "no output"

def bench_run(r):  # what the results file keeps of one bench
    return {"policy": r["optimized_policy"], "attention_kernels_optimized": r["attention_kernels_optimized"],
            "compile_s": r.get("compile_s"), "compile_fallback": r.get("compile_fallback"),
            "compiled_attention": r.get("compiled_attention"), "memory": r.get("memory"),
            "read_bandwidth_gb_s": r["read_bandwidth_gb_s"], "floors": r["floors"],
            "settings": r["settings"], "summary": r["summary"], "table": format_bench(r).splitlines()}

runs, errors, environment = {}, {}, None
for p in sys.argv[4:]:
    r, errors[f"bench-{p}"] = load(f"bench-{p}")
    if r:
        environment = environment or r["environment"]
        runs[p] = bench_run(r)
multilingual, errors["bench-multilingual"] = load("bench-multilingual")
if multilingual:
    environment = environment or multilingual["environment"]
    multilingual = bench_run(multilingual)
diagnose, errors["diagnose"] = load("diagnose")
load_study, errors["load"] = load("load")
served, errors["serve-load"] = load("serve-load")
sampling, errors["sampling"] = load("sampling")
traced, errors["trace"] = load("trace")
if traced and not dry:  # the trimmed decode-region traces, kept beside the results file
    import shutil
    keep = out.parent / "traces"
    keep.mkdir(exist_ok=True)
    for step, path in traced["traces"].items():
        if Path(path).is_file():  # not when combining steps recorded on another machine
            traced["traces"][step] = str(shutil.copy(path, keep / f"decode_{step}.json.gz"))
for study in (load_study, served):  # the per-stream rows stay in the step's own JSON
    for level in (study or {}).get("levels", []):
        level.pop("per_stream")
result = {
    "what": "scripts/gpu_check.sh: upstream vs optimized, full-size random weights" if not dry
    else "DRY RUN on CPU with the tiny model: not a GPU result",
    "environment": environment,
    "note": os.environ["GPU_CHECK_NOTE"],
    "runs": runs,
    "multilingual": multilingual,
    "diagnose": diagnose,
    "load": load_study,
    "serve_load": served,
    "sampling": sampling,
    "trace": traced,
    "errors": {k: v for k, v in errors.items() if v},
}
out.write_text(json.dumps(result, indent=2))
for p, r in runs.items():
    print(f"\n## optimized policy {p}\n" + "\n".join(r["table"]))
if multilingual:
    print("\n## Multilingual, optimized policy bfloat16\n" + "\n".join(multilingual["table"]))
if diagnose:
    print("\n## diagnosis (upstream float32 decode, then a float16 cast):")
    print(json.dumps({"kernels": diagnose["kernels"], "attention": diagnose["attention"]}, indent=1)[:3000])
if load_study:
    from tts_workbench.studies.load import format_load
    print("\n## load study\n" + format_load(load_study))
if served:
    from tts_workbench.studies.load import format_load
    print("\n## the same streams over HTTP (serve, one replica)\n" + format_load(served))
if sampling:
    print("\n## sampling, batched / one stream at a time:", sampling["batched_over_one_by_one"])
if traced:
    from tts_workbench.studies.trace_report import format_decode_traces
    print("\n## T3 decode region on the device (HolisticTraceAnalysis)\n" + format_decode_traces(traced))
print(f"\nerrors: {sorted(result['errors']) or 'none'}\nwrote {out}")
sys.exit(1 if result["errors"] else 0)
PY
