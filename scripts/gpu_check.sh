#!/usr/bin/env bash
# The one prepared GPU check (issues 7 and 13; scripts/gpu_identity.py checks the compiled paths'
# tokens and frames against the eager ones on the same machine). On an offline machine with an
# NVIDIA GPU and the image's CUDA PyTorch: install the carried wheels (scripts/prepare_gpu_wheels.sh), then
#   0. record the environment (GPU, driver, CUDA, torch, transformers, chatterbox-tts, date, CPUs:
#      core.machine.environment, plus nvidia-smi's query) and the mode (gpu or dry-run);
#   1. bench upstream (float32, as it loads) vs the optimized wrapper with the eager, static-cache
#      and compiled (CUDA graphs) decode step, one-shot and buffered streaming (eager vs compiled;
#      upstream's naive streaming only where GPU_CHECK_CONFIGS names upstream-stream), on the
#      full-size random model, for each dtype policy asked (default bfloat16 only), recording the
#      attention kernel that ran, T3 ms per token, compile time, peak CUDA memory, TTFA and RTF;
#      its memory figure is copied beside the results file (NAME_bench-POLICY_memory.png);
#   1b. (GPU_CHECK_MULTILINGUAL=1) the same bench on the Multilingual model (bfloat16; its static and
#      compiled steps decode without the alignment analyzer, README);
#   1c. (GPU_CHECK_LOAD=1, GPU_CHECK_SERVE=1) the load study, in process and over HTTP; its figure
#      is copied beside the results file (NAME_load.png, NAME_serve-load.png);
#   1d. (GPU_CHECK_FUSION=1) the compiled T3 step with its projections fused vs unfused, one stream
#      and the engine at 8 streams, bfloat16 (scripts/fusion_study.py, issue 22; four compiles);
#   2. (GPU_CHECK_TRACE=1, the default) `tts-workbench trace`: T3's decode with the eager and the
#      compiled step profiled after a warm-up, each one's t3.decode region (its first 20 steps)
#      cut and copied to traces/ beside the results file (issue 22); the image has no
#      HolisticTraceAnalysis (and its plotly would not fit the carried wheels), so they are read
#      back here: tts-workbench trace --read results/traces/decode_*.json.gz
#   3. sampling the next tokens of 1, 8, 32 and 64 streams: upstream's way one stream at a time
#      vs sampling.Sampler batched (scripts/sampling_study.py, ~30 s; it needs chatterbox too),
#      last of the default steps: the one a short deadline may skip;
#   4. (GPU_CHECK_DIAGNOSE=1) the diagnosis on CUDA: which SDPA kernel upstream's float32 decode
#      ran, why Flash was refused, and where a float16 cast breaks.
# Each step runs on its own, under the exit watchdog (below) and a time limit: one that fails or
# runs out is recorded with the end of its stderr and the next one still runs. A step whose Python
# modules are missing is not started (recorded as skipped, the modules named). After EVERY step the
# results file is rewritten from the step folder (and the folder packed beside it), so a call
# killed at its limit still returns every step finished before. The whole run keeps to a deadline
# (GPU_CHECK_DEADLINE_S, counted from the script's start): each step's limit, and the wheel
# install's, is cut to what is left of it, and a step that cannot get GPU_CHECK_MIN_STEP_S seconds
# is skipped, with why. The results file is first written before the install.
#
#   scripts/gpu_check.sh            # on the GPU machine. The current default set (6 configs in
#                                   # bfloat16, then the trace and sampling) has not been timed on a
#                                   # GPU; an older one, the bench alone, ran in one call on an H200
#   scripts/gpu_check.sh --dry-run  # here, on CPU: tiny model, a few tokens, no install (a test runs this)
#   GPU_CHECK_POLICIES="bfloat16 float16"  # the policies (default: bfloat16; "" for none)
#   GPU_CHECK_CONFIGS=LIST          # the bench's configs (default upstream,optimized,static,compiled,
#                                   # optimized-stream,compiled-stream)
#   GPU_CHECK_TOKENS=150            # tokens per run, GPU only (the dry run: 8); diagnose takes a third,
#                                   # trace at most 60
#   GPU_CHECK_TRACE=0               # skip the trace step (default 1: run it)
#   GPU_CHECK_DIAGNOSE=1            # also run the diagnosis step (default: skipped)
#   GPU_CHECK_MULTILINGUAL=1        # also bench the Multilingual model (configs GPU_CHECK_MULTILINGUAL_CONFIGS,
#                                   # default upstream,optimized,compiled,optimized-stream,compiled-stream)
#   GPU_CHECK_LOAD=1                # also run the load study (issue 19): the stream engine with the
#                                   # compiled step, T3 in bfloat16, levels GPU_CHECK_LOAD_LEVELS
#                                   # (default 1,8,32,64; dry run 1,2); alone (sampling follows if time
#                                   # is left): GPU_CHECK_POLICIES="" GPU_CHECK_TRACE=0 GPU_CHECK_LOAD=1
#   GPU_CHECK_STEP_BUCKETS=1,8      # the load study's T3 step buckets (default: the levels, so each
#                                   # level compiles its own size only, ~50 s each on the H200)
#   GPU_CHECK_LOAD_FLOW=compiled    # the load study's S3Gen estimator (default eager)
#   GPU_CHECK_FLOW_BATCHES=1,4      # windows per flow call (compiled default 4, or the largest level
#                                   # if fewer: one compile per window kind and size, ~40 s each on the
#                                   # H200; eager default: the engine's own, every ready window of a
#                                   # voice and length up to the level)
#   GPU_CHECK_SERVE=1               # also serve one replica (compiled, T3 bfloat16) and send the load
#                                   # study's levels to it with `load --url` (issue 20's GPU row); needs
#                                   # Ray Serve, which the GPU image lacks: carry gpu-serve/
#                                   # (prepare_gpu_wheels.sh --serve) in a call of its own right after
#                                   # one that carried gpu-wheels/ (docs/gpu-check.md); without it the
#                                   # step is recorded as skipped, the missing modules named
#   GPU_CHECK_FUSION=1              # also run the fused-projection study (step 1d; dry run: tiny, 2 streams)
#   GPU_CHECK_PORT=8123             # the serve step's port on 127.0.0.1
#   GPU_CHECK_SERVE_CACHE=320       # the served engine's cache positions per stream (--max-cache-len)
#   GPU_CHECK_OUT=FILE              # the results file (default results/gpu_check.json; dry run
#                                   # runs/gpu_check_dry.json, so a dry run never overwrites a GPU result)
#   GPU_CHECK_DIR=DIR               # where each step's raw JSON, stderr and status go (default
#                                   # runs/gpu_check, dry run runs/gpu_check_dry)
#   GPU_CHECK_BUNDLE=FILE.tar.gz    # DIR's files (not its traces/ folder) packed after every step
#                                   # (default: beside the results file, NAME_steps.tar.gz; "" for none;
#                                   # --combine: none)
#   GPU_CHECK_DEADLINE_S=570        # the whole run's deadline in s from the start (default 570 on the
#                                   # GPU, under a 600 s call; dry run: none, 0). Keep it under the call's limit
#   GPU_CHECK_STEP_LIMIT=540        # one step's limit in s (dry run 300), cut to what the deadline leaves
#   GPU_CHECK_RESERVE_S=30          # kept back at the deadline for a stopped step's kill (15 s) and the results file
#   GPU_CHECK_MIN_STEP_S=30         # a step given less is not started (dry run 10)
#   GPU_CHECK_EXIT_GRACE=30         # a step whose report is complete is stopped this long after
#   GPU_CHECK_REFERENCE=WAV         # dry run: the voice to use (default: a generated 2 s one)
#   GPU_CHECK_NOTE=TEXT             # copied into the results file's `note`
#   PYTHON=PATH                     # dry run and --combine: the Python to use (default .venv/bin/python;
#                                   # the GPU run uses the image's python3)
#   scripts/gpu_check.sh --combine  # only write the results file from GPU_CHECK_DIR's steps (and GPU_CHECK_NOTE);
#                                   # refused (status 2, nothing written) where the folder has no mode file
set -uo pipefail
# Requests to the serve step's server (127.0.0.1) go straight to it: urllib (the health wait) and
# httpx (`load --url`) send them to the environment's http_proxy otherwise, which cannot reach this
# machine's loopback. Added to both spellings' entries (Python reads no_proxy when both are set).
export no_proxy="${no_proxy:+$no_proxy,}${NO_PROXY:+$NO_PROXY,}127.0.0.1,localhost"
export NO_PROXY=$no_proxy
cd "$(dirname "$0")/.."
SECONDS=0  # the deadline counts from here: the install and every step inside it
MODE=gpu
[[ "${1:-}" == "--dry-run" ]] && MODE=dry-run
[[ "${1:-}" == "--combine" ]] && MODE=combine
if [[ $MODE == gpu || $MODE == combine ]]; then
    OUT=${GPU_CHECK_OUT:-results/gpu_check.json}; DIR=${GPU_CHECK_DIR:-runs/gpu_check}
else
    OUT=${GPU_CHECK_OUT:-runs/gpu_check_dry.json}; DIR=${GPU_CHECK_DIR:-runs/gpu_check_dry}
fi
[[ $MODE == combine ]] && BUNDLE=${GPU_CHECK_BUNDLE-} || BUNDLE=${GPU_CHECK_BUNDLE-${OUT%.json}_steps.tar.gz}
CONFIGS=${GPU_CHECK_CONFIGS:-upstream,optimized,static,compiled,optimized-stream,compiled-stream}
NEEDS_MODEL="torch transformers chatterbox"  # what every model step imports
if [[ $MODE == combine && ! -f $DIR/mode ]]; then
    # Combining a folder that is not there (the default runs/gpu_check, a mistyped GPU_CHECK_DIR)
    # wrote an empty "complete" results file over OUT: by default the 2026-11-28 GPU result.
    echo "gpu_check.sh --combine: no steps in $DIR (it has no mode file): unpack the calls'" \
        "*_steps.tar.gz there first (mkdir -p $DIR && tar xzf FILE -C $DIR), or name their folder with GPU_CHECK_DIR" >&2
    exit 2
fi
mkdir -p "$DIR" "$(dirname "$OUT")"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# The results file, rewritten from DIR after every step: written whole and then renamed, so a call
# killed while it is written still returns the previous one. `complete` is false until the end.
COMBINE_PY=$(cat <<'PY'
import json, os, shutil, sys, tarfile, time
from pathlib import Path
d, out, bundle, final = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "final"
mode = (d / "mode").read_text().strip()  # written before any combine; --combine refuses a folder without it
# A run takes only its own steps (files written since it wrote DIR/mode); --combine takes them all.
since = (d / "mode").stat().st_mtime if sys.argv[5] == "run" else None
skipped, steps, errors = {}, {}, {}

def read(p):
    return p.read_text(errors="replace") if p.exists() else None

def load(name):  # the step's report, or None; its error or skip is recorded on the way
    files = [d / f"{name}.{x}" for x in ("json", "err", "skipped")]
    if since is not None and not any(p.exists() and p.stat().st_mtime >= since for p in files):
        return None  # not run, or left by an earlier run
    report, skip = [p for p in files[:2] if p.exists()], files[2]
    try:
        r, parsed = json.loads(files[0].read_text()), True
    except (OSError, ValueError):
        r, parsed = None, False
    # A run leaves a skip or a report, never both; calls' bundles unpacked into one folder (tar keeps
    # each file's time) can hold one call's skip beside another's report or error. A report that
    # parses is kept whichever call was later (a later skip dropped it before 2026-12-05); a skip is
    # kept over an error or no report.
    if skip.exists() and not parsed:
        skipped[name] = read(skip).strip()
        if report:  # another call's error or unreadable report: kept as a note, not lost
            steps[name] = {"error_of_another_call": (read(d / f"{name}.err") or "no output")[-3000:]}
        return None
    if not report:
        return None  # not run
    try:
        steps[name] = json.loads(read(d / f"{name}.status") or "null")
    except ValueError:
        pass
    if parsed:
        if skip.exists() and skip.stat().st_mtime > max(p.stat().st_mtime for p in report):
            steps[name] = {**(steps.get(name) or {}), "skipped_by_a_later_call": read(skip).strip()}
        return r
    err = (read(d / f"{name}.err") or "")[-3000:]
    s = steps.get(name) or {}
    if s.get("running"):  # the combine at its start: what a call killed during it returns
        err = (f"unfinished: started at {s['started_at_s']} s of the run with a limit of {s['limit_s']} s,"
               " still running when this file was written\n" + err)
    elif s.get("rc") in (124, 137):  # timeout's status when it stopped the step
        err = f"stopped at its time limit ({s['limit_s']} s) after {s['seconds']} s\n" + err
    errors[name] = err or "no output"
    return None

def keep_figure(path, name):  # copy a figure of the run's temp folder beside the results file
    # The temp folder is deleted at the run's end (before 2026-12-04 the results file kept the load
    # study's `files`, before 2026-12-05 the bench table's "wrote" line named them): the copy, named
    # NAME_name.png, comes back from a device call. --combine, without the temp folder, copies none.
    figure = Path(path or "")
    return shutil.copy(figure, out.with_name(f"{out.stem}_{name}.png")).name if figure.is_file() else None

def table(name, r):  # the bench table, made once per report (it imports torch and chatterbox)
    cache = d / f"{name}.table"
    if cache.exists() and cache.stat().st_mtime >= (d / f"{name}.json").stat().st_mtime:
        return cache.read_text().splitlines()
    try:
        from tts_workbench.core.quiet import quiet_libraries
        quiet_libraries()
        from tts_workbench.studies.bench import format_bench
        text = format_bench(r)
    except Exception as e:  # never lose the results file to its table
        return [f"(no table: {type(e).__name__}: {e})"]
    cache.write_text(text)
    return text.splitlines()

def bench_run(name, r):  # what the results file keeps of one bench
    # its `files` out of the table (no "wrote" line), its memory figure kept (named relative to `out`)
    figure = keep_figure(r.pop("files", {}).get("memory.png"), f"{name}_memory")
    return {"policy": r["optimized_policy"], "attention_kernels_optimized": r["attention_kernels_optimized"],
            "compile_s": r.get("compile_s"), "compile_fallback": r.get("compile_fallback"),
            "flow_compile_fallback": r.get("flow_compile_fallback"),
            "compiled_attention": r.get("compiled_attention"), "memory": r.get("memory"),
            "read_bandwidth_gb_s": r["read_bandwidth_gb_s"],
            "read_bandwidth_after_gb_s": r.get("read_bandwidth_after_gb_s"), "floors": r["floors"],
            "settings": r["settings"], "summary": r["summary"], "figure": figure, "table": table(name, r)}

load("install")  # an install that failed (GPU run) leaves install.err
environment = load("environment")  # recorded once at the start
runs = {}
benches = sorted({p.name.split(".")[0] for p in d.glob("bench-*")} - {"bench-multilingual"})
for name in benches:
    r = load(name)
    if r:
        environment = environment or r["environment"]  # a folder from before the environment step
        runs[name.removeprefix("bench-")] = bench_run(name, r)
multilingual = load("bench-multilingual")
if multilingual:
    environment = environment or multilingual["environment"]
    multilingual = bench_run("bench-multilingual", multilingual)
smi = read(d / "nvidia-smi.csv")
smi = smi.strip().splitlines() if smi else None
try:  # the driver, which environment() does not know, from nvidia-smi's first GPU
    import csv
    gpu = dict(zip(*[[c.strip() for c in row] for row in csv.reader(smi[:2])]))
    environment = {**(environment or {}), "driver": gpu["driver_version"]}
except (TypeError, ValueError, KeyError):
    pass
diagnose, load_study, served = load("diagnose"), load("load"), load("serve-load")
sampling, traced, fusion = load("sampling"), load("trace"), load("fusion")
if traced and mode != "dry-run":  # the trimmed decode-region traces, kept beside the results file
    keep = out.parent / "traces"
    keep.mkdir(exist_ok=True)
    for step, path in traced["traces"].items():
        # named relative to the results file, as figures are: the copy comes back from a device
        # call, the path it was cut to there does not (before 2026-12-05 that path was kept)
        kept = f"traces/decode_{step}.json.gz"
        if Path(path).is_file():
            shutil.copy(path, out.parent / kept)
        # combining steps recorded on another machine: the device's path is gone, the copy that came
        # back is named as above where it lies beside the results file (else the path is kept)
        if (out.parent / kept).is_file():
            traced["traces"][step] = kept
for name, study in (("load", load_study), ("serve-load", served)):
    for level in (study or {}).get("levels", []):  # the per-stream rows stay in the step's own JSON
        level.pop("per_stream", None)
    figure = keep_figure((study or {}).pop("files", {}).get("figure"), name)
    if figure:
        study["figure"] = figure
what = {
    "gpu": "scripts/gpu_check.sh: upstream vs optimized, full-size random weights",
    "dry-run": "DRY RUN on CPU with the tiny model: not a GPU result",
}.get(mode, "scripts/gpu_check.sh: mode not recorded in the step folder (gpu or dry run unknown)")
result = {
    "what": what,
    "mode": mode,
    "complete": final,  # false: the run was still going (or was killed) when this was written
    "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "environment": environment,
    "nvidia_smi": smi,
    "note": os.environ.get("GPU_CHECK_NOTE", ""),
    "runs": runs,
    "multilingual": multilingual,
    "diagnose": diagnose,
    "load": load_study,
    "serve_load": served,
    "sampling": sampling,
    "fusion": fusion,
    "trace": traced,
    "steps": steps,  # each step's exit status, seconds and limit
    "skipped": skipped,  # steps not started, with why
    "errors": errors,
}
part = out.with_name(out.name + ".part")
part.write_text(json.dumps(result, indent=2))
os.replace(part, out)
if bundle:  # the step folder's files (not the profiler's traces/ folder), packed the same way
    part = Path(bundle + ".part")
    with tarfile.open(part, "w:gz") as tar:
        for p in sorted(d.iterdir()):
            if p.is_file():
                tar.add(p, arcname=p.name)
    os.replace(part, bundle)
if not final:
    sys.exit(0)
def shown(r):  # a bench's table, then its figure's path where one was kept
    return "\n".join(r["table"] + ([f"figure: {out.parent / r['figure']}"] if r["figure"] else []))

for p, r in runs.items():
    print(f"\n## optimized policy {p}\n" + shown(r))
if multilingual:
    policy = multilingual["policy"]["policy"]
    print(f"\n## Multilingual, optimized policy {policy}\n" + shown(multilingual))
if diagnose:
    print("\n## diagnosis (upstream float32 decode, then a float16 cast):")
    print(json.dumps({"kernels": diagnose["kernels"], "attention": diagnose["attention"]}, indent=1)[:3000])
if load_study or served or traced:
    from tts_workbench.core.quiet import quiet_libraries
    quiet_libraries()
if load_study:
    from tts_workbench.studies.load import format_load
    print("\n## load study\n" + format_load(load_study))
if served:
    from tts_workbench.studies.load import format_load
    print("\n## the same streams over HTTP (serve, one replica)\n" + format_load(served))
for study in (load_study, served):
    if study and "figure" in study:
        print(f"figure: {out.parent / study['figure']}")
if sampling:
    print("\n## sampling, batched / one stream at a time:", sampling["batched_over_one_by_one"])
if fusion:
    print("\n## fused projections, fused / unfused:",
          {k: v["fused_over_unfused"] for k, v in fusion.items() if isinstance(v, dict) and "median_ms" in v})
if traced:
    from tts_workbench.studies.trace_report import format_decode_traces
    # where each trace is from here (out.parent / an absolute path is that path)
    here = {step: str(out.parent / path) for step, path in traced["traces"].items()}
    print("\n## T3 decode region traces, cut on the device and not read (trace --read reads them)\n"
          + format_decode_traces({**traced, "traces": here}))
for name, why in skipped.items():
    print(f"skipped {name}: {why}")
print(f"\nerrors: {sorted(errors) or 'none'}\nskipped: {sorted(skipped) or 'none'}\nwrote {out}"
      + (f" and {bundle}" if bundle else ""))
sys.exit(1 if errors or skipped else 0)
PY
)
combine() {  # combine [final]: rewrite the results file (and the bundle) from DIR
    GPU_CHECK_NOTE=${GPU_CHECK_NOTE:-} $PY -c "$COMBINE_PY" "$DIR" "$OUT" "$BUNDLE" "${1:-partial}" "$SCOPE"
}

SCOPE=run
if [[ $MODE == combine ]]; then
    PY=${PYTHON:-.venv/bin/python}; SCOPE=all
    combine final
    exit $?
fi
if [[ $MODE == dry-run ]]; then
    PY=${PYTHON:-.venv/bin/python}; MODEL=tiny; MULTILINGUAL=multilingual-tiny; DEVICE=cpu; TOKENS=8; REPEATS=1; WARMUP=0
    LIMIT=${GPU_CHECK_STEP_LIMIT:-300}; DEADLINE=${GPU_CHECK_DEADLINE_S:-0}; MIN_STEP=${GPU_CHECK_MIN_STEP_S:-10}
else
    PY=python3; MODEL=random; MULTILINGUAL=multilingual-random; DEVICE=cuda
    TOKENS=${GPU_CHECK_TOKENS:-150}; REPEATS=2; WARMUP=1
    LIMIT=${GPU_CHECK_STEP_LIMIT:-540}; DEADLINE=${GPU_CHECK_DEADLINE_S:-570}; MIN_STEP=${GPU_CHECK_MIN_STEP_S:-30}
fi
RESERVE=${GPU_CHECK_RESERVE_S:-30}
left() { echo $((DEADLINE - SECONDS - RESERVE)); }  # seconds a step may still take (DEADLINE > 0)
step_limit() {  # the step limit, cut to what the deadline leaves
    local limit=$LIMIT
    if ((DEADLINE > 0)) && (($(left) < limit)); then limit=$(left); fi
    echo $((limit < 1 ? 1 : limit))  # timeout 0 would mean none
}

rm -f "$DIR/nvidia-smi.csv" "$DIR"/install.{json,err,status}
echo "$MODE" > "$DIR/mode"  # read back by the combine: a dry run's steps never read as a GPU result
combine  # a call killed during the install returns a results file too (it returned none before 2026-12-05)
if [[ $MODE == gpu ]]; then
    # The image's python3 is itself a venv holding CUDA torch: install the carried wheels into a
    # folder that PYTHONPATH puts ahead of it (transformers 5.2.0 then shadows the image's newer one).
    # Under a step's limit: the deadline counts the install (it had its own 300 s before 2026-12-05).
    # gpu-serve/ (the serve step's, prepare_gpu_wheels.sh --serve) is too large to travel with
    # gpu-wheels/: a second call carries it to the same warm machine, where gpu-wheels/ is still there.
    WHEELS=()
    for d in gpu-wheels gpu-serve; do
        if compgen -G "$d/*.whl" > /dev/null; then WHEELS+=("$d"/*.whl); else echo "no wheels in $d/ (not carried)" >&2; fi
    done
    limit=$(step_limit); t0=$SECONDS
    timeout -k 15 "$limit" $PY -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target /tmp/site \
        ${WHEELS[@]+"${WHEELS[@]}"} > "$TMP/install.log" 2>&1
    rc=$?
    if ((rc != 0)); then  # its status read back like a step's: a stop at the limit is said so
        cat "$TMP/install.log" >&2; cp "$TMP/install.log" "$DIR/install.err"
        printf '{"rc": %d, "seconds": %d, "limit_s": %d}\n' "$rc" "$((SECONDS - t0))" "$limit" \
            > "$DIR/install.status"
        combine final; exit 1
    fi
    # The package runs from the checkout (the image's Python is 3.12; pyproject pins 3.11 for CI).
    export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm \
        --format=csv > "$DIR/nvidia-smi.csv" 2>&1
    cat "$DIR/nvidia-smi.csv" >&2
fi
REF=()
if [[ $MODE == dry-run ]]; then  # a 2 s voice keeps the dry run short (S3Gen re-encodes the prompt every call)
    REF=(--reference "${GPU_CHECK_REFERENCE:-$TMP/ref.wav}")  # a caller's own saves a process start
    [[ -n ${GPU_CHECK_REFERENCE:-} ]] || $PY -c "import sys; from tts_workbench.models.reference import make_reference_wav; make_reference_wav(sys.argv[1], seconds=2)" "$TMP/ref.wav"
fi
why_not() {  # why_not MODULES...: print why a step cannot start (time, missing modules); status 1 if it can
    if ((DEADLINE > 0)) && (($(left) < MIN_STEP)); then
        echo "not started: $((DEADLINE - SECONDS)) s were left of the ${DEADLINE} s deadline (GPU_CHECK_DEADLINE_S, $RESERVE s of it kept for the end), under the $MIN_STEP s a step gets at least (GPU_CHECK_MIN_STEP_S)"
        return 0
    fi
    (($# > 0)) || return 1
    local missing
    missing=$($PY -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' "$@" 2>&1) \
        || { echo "not started: its Python modules could not be looked up: $missing"; return 0; }
    [[ -z $missing ]] && return 1
    echo "not started: Python modules missing here: $missing (neither in this Python nor in the carried wheels)"
}
skip() {  # skip NAME WHY: record the step as not started, with why
    rm -f "$DIR/$1".{json,err,status,table}
    echo "$2" > "$DIR/$1.skipped"
    echo "== $1: skipped: $2" >&2
    combine
}

# A step that has printed its whole report but does not exit is stopped EXIT_GRACE s later: at
# exit, Inductor waits up to 300 s for its compile-worker process (pytorch/pytorch#162199), and
# the Turbo run of 2026-11-28 sat past its call's limit after its report was complete.
EXIT_GRACE=${GPU_CHECK_EXIT_GRACE:-30}
step() {  # step [--plain] NAME COMMAND...: stdout to DIR/NAME.json, stderr to DIR/NAME.err,
    # exit status to DIR/NAME.status; never fatal. Without --plain the dry run's reference and --json are
    # appended. Not started where NEEDS_MODEL's modules are missing: every step imports them.
    local plain=0
    [[ ${1:-} == --plain ]] && { plain=1; shift; }
    local name=$1; shift
    rm -f "$DIR/$name".{json,err,skipped,status,table}  # nothing of an earlier run taken for this one's
    local why
    # shellcheck disable=SC2086
    if why=$(why_not $NEEDS_MODEL); then skip "$name" "$why"; return; fi
    local limit extra=()
    limit=$(step_limit)
    ((plain)) || extra=("${REF[@]}" --json)
    echo "== $name (limit ${limit} s, at ${SECONDS} s)" >&2
    : > "$DIR/$name.json"
    printf '{"running": true, "started_at_s": %d, "limit_s": %d}\n' "$SECONDS" "$limit" > "$DIR/$name.status"
    combine  # so a call killed during this step returns the results file saying which step it was in
    local t0=$SECONDS done_at="" stopped=false
    timeout -k 15 "$limit" "$@" "${extra[@]}" > "$DIR/$name.json" 2> "$DIR/$name.err" &
    local pid=$!
    while kill -0 $pid 2>/dev/null; do
        if [[ -z $done_at && -s "$DIR/$name.json" ]] \
            && $PY -c 'import json, sys; json.load(open(sys.argv[1]))' "$DIR/$name.json" 2>/dev/null; then
            done_at=$SECONDS
        elif [[ -n $done_at ]] && ((SECONDS - done_at > EXIT_GRACE)); then
            echo "   its report is complete but it has not exited ${EXIT_GRACE} s later: stopped" >&2
            kill -TERM $pid
            stopped=true
            break
        fi
        sleep 1
    done
    wait $pid
    local rc=$?
    # its own limit (timeout's 124, or 137 after -k) came after a complete report: stopped after it too
    [[ -n $done_at && ($rc == 124 || $rc == 137) ]] && stopped=true
    printf '{"rc": %d, "seconds": %d, "limit_s": %d, "stopped_after_report": %s}\n' \
        "$rc" "$((SECONDS - t0))" "$limit" "$stopped" > "$DIR/$name.status"
    echo "   rc $rc in $((SECONDS - t0)) s" >&2
    # the load study's summary of each level it finished, into the log even when stopped before its report
    grep -h '^level [0-9]*: ' "$DIR/$name.err" >&2 || true
    [[ $rc == 0 || -n $done_at ]] || tail -5 "$DIR/$name.err" >&2  # a stopped step's report is whole
    combine
}

step --plain environment $PY -c 'import json, sys
from tts_workbench.core.quiet import quiet_libraries
quiet_libraries()
from tts_workbench.core.machine import environment
json.dump(environment(sys.argv[1], sys.argv[2]), sys.stdout, indent=1)
print()' "$MODEL" "$DEVICE"
POLICIES=${GPU_CHECK_POLICIES-bfloat16}
for policy in $POLICIES; do
    step "bench-$policy" $PY -m tts_workbench.interface.cli bench --model $MODEL --device $DEVICE --tokens $TOKENS \
        --repeats $REPEATS --warmup $WARMUP --configs "$CONFIGS" --dtype "$policy" --out "$TMP/$policy"
done
if [[ ${GPU_CHECK_MULTILINGUAL:-0} == 1 ]]; then
    ML_CONFIGS=${GPU_CHECK_MULTILINGUAL_CONFIGS:-upstream,optimized,compiled,optimized-stream,compiled-stream}
    ML_DTYPE=()  # the wrapper's policy, given only where a config runs the wrapper (bench refuses it else)
    for c in ${ML_CONFIGS//,/ }; do [[ $c == upstream* ]] || ML_DTYPE=(--dtype bfloat16); done
    step bench-multilingual $PY -m tts_workbench.interface.cli bench --model $MULTILINGUAL --device $DEVICE \
        --tokens $TOKENS --repeats $REPEATS --warmup $WARMUP ${ML_DTYPE[@]+"${ML_DTYPE[@]}"} \
        --out "$TMP/multilingual" --configs "$ML_CONFIGS"
fi
[[ $MODE == dry-run ]] && LEVELS=${GPU_CHECK_LOAD_LEVELS:-1,2} || LEVELS=${GPU_CHECK_LOAD_LEVELS:-1,8,32,64}
LARGEST=$(tr ',' '\n' <<<"$LEVELS" | sort -n | tail -1)
# The engine's settings, the same in process (load) and served (serve): the served figures are
# compared with the in-process ones, and a second call's server finds the first call's compiles in
# Inductor's cache on the same machine.
ENGINE_ARGS=(--decode compiled --dtype bfloat16 --step-buckets "${GPU_CHECK_STEP_BUCKETS:-$LEVELS}"
    --flow "${GPU_CHECK_LOAD_FLOW:-eager}")
if [[ -n ${GPU_CHECK_FLOW_BATCHES:-} ]]; then
    ENGINE_ARGS+=(--flow-batches "$GPU_CHECK_FLOW_BATCHES")
elif [[ ${GPU_CHECK_LOAD_FLOW:-eager} == compiled ]]; then  # few shapes: each costs a compile
    # 4 windows a call, or the largest level where that is fewer (load refuses a larger size)
    ENGINE_ARGS+=(--flow-batches $(( LARGEST < 4 ? LARGEST : 4 )))
fi
if [[ ${GPU_CHECK_LOAD:-0} == 1 ]]; then
    step load $PY -m tts_workbench.interface.cli load --model $MODEL --device $DEVICE --tokens $TOKENS \
        --streams "$LEVELS" --out "$TMP/load" "${ENGINE_ARGS[@]}"
fi
if [[ ${GPU_CHECK_SERVE:-0} == 1 ]]; then  # the same streams over HTTP (issue 20)
    PORT=${GPU_CHECK_PORT:-8123}
    rm -f "$DIR"/serve-load.{json,err,skipped,status,table} "$DIR"/serve.{out,err}
    # shellcheck disable=SC2086
    if why=$(why_not $NEEDS_MODEL ray fastapi starlette uvicorn pydantic prometheus_client httpx); then
        skip serve-load "$why"
    elif WAIT_S=$(step_limit) && ((DEADLINE > 0)) && ((WAIT_S - MIN_STEP < MIN_STEP)); then
        skip serve-load "not started: $((DEADLINE - SECONDS)) s were left of the ${DEADLINE} s deadline, too few to start the server and then run the load (GPU_CHECK_MIN_STEP_S=$MIN_STEP each)"
    else
        ((DEADLINE > 0)) && WAIT_S=$((WAIT_S - MIN_STEP))  # the load step keeps its minimum
        echo "== serve (one replica on a local Ray; answering within ${WAIT_S} s)" >&2
        $PY -m tts_workbench.interface.cli serve --model $MODEL --device $DEVICE --port $PORT "${ENGINE_ARGS[@]}" \
            --max-streams "$LARGEST" --max-cache-len ${GPU_CHECK_SERVE_CACHE:-320} --max-input-chars 200 --tokens $TOKENS \
            --out "$TMP/serve" > "$DIR/serve.out" 2> "$DIR/serve.err" &
        SERVER=$!
        if WAITED=$($PY -c '
import os, sys, time, urllib.request
port, limit, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
t0 = time.monotonic()
while True:  # until the replica has built, compiled and answers, or the seconds given have passed
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
            sys.exit(print(f"the server answered after {time.monotonic() - t0:.0f} s"))
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"the server exited after {time.monotonic() - t0:.0f} s without answering")
    if time.monotonic() - t0 >= limit:
        sys.exit(f"the server did not answer within {limit:.0f} s")
    time.sleep(max(0.0, min(1.0, limit - (time.monotonic() - t0))))' "$PORT" "$WAIT_S" "$SERVER" 2>&1); then
            echo "   $WAITED" >&2
            # --plain: `load --url` refuses --reference (the voice is the server's); --json given here
            step --plain serve-load $PY -m tts_workbench.interface.cli load --url "http://127.0.0.1:$PORT" \
                --tokens $TOKENS --streams "$LEVELS" --out "$TMP/serve-load" --json
        else  # no load sent to a server that is not there: an error, with the server's own stderr
            echo "   $WAITED: serve-load not run" >&2
            : > "$DIR/serve-load.json"
            { echo "not run: $WAITED"; echo "--- the end of the server's stderr (serve.err):"; tail -20 "$DIR/serve.err"; } \
                > "$DIR/serve-load.err"
            tail -5 "$DIR/serve.err" >&2
            combine
        fi
        GRACE=120  # the server's shutdown, within the deadline
        ((DEADLINE > 0)) && GRACE=$((DEADLINE - SECONDS - RESERVE < 120 ? DEADLINE - SECONDS - RESERVE : 120))
        ((GRACE < 5)) && GRACE=5
        kill -TERM $SERVER 2>/dev/null; timeout $GRACE tail --pid=$SERVER -f /dev/null || kill -KILL $SERVER 2>/dev/null
    fi
fi
if [[ ${GPU_CHECK_FUSION:-0} == 1 ]]; then  # a script of its own arguments: --plain (it prints JSON)
    [[ $MODE == dry-run ]] && FUSION=(--repeats 1 --streams 2) || FUSION=(--policy bfloat16 --repeats 3 --streams 8)
    step --plain fusion $PY scripts/fusion_study.py --model $MODEL --device $DEVICE "${FUSION[@]}"
fi
if [[ ${GPU_CHECK_TRACE:-1} == 1 ]]; then
    [[ $MODE == dry-run ]] && STEPS=eager,static || STEPS=eager,compiled  # no compile in the dry run
    step trace $PY -m tts_workbench.interface.cli trace --model $MODEL --device $DEVICE --tokens $((TOKENS < 60 ? TOKENS : 60)) \
        --steps $STEPS --dtype bfloat16 --keep 20 --logdir "$DIR/traces" --cut-only
fi
# sampling B streams: one at a time vs sampling.Sampler batched, same tokens (a script of its own
# arguments: --plain, no reference and no --json, it prints JSON anyway); after the trace, being
# the step least needed (a short deadline skips the last). It needs what the model
# steps need: it imports studies.bench, which imports chatterbox (before 2026-12-04 it looked for
# torch and transformers alone, and without chatterbox it failed instead of being skipped).
[[ $MODE == dry-run ]] && SAMPLING=(--streams 2 --min-run-time 0.2) || SAMPLING=(--streams 1,8,32,64)
step --plain sampling $PY scripts/sampling_study.py --device $DEVICE "${SAMPLING[@]}"
[[ ${GPU_CHECK_DIAGNOSE:-0} == 0 ]] || step diagnose $PY -m tts_workbench.interface.cli diagnose --model $MODEL --device $DEVICE --tokens $((TOKENS / 3 + 1)) \
    --dtype float16 --out "$TMP/diagnose"

combine final
