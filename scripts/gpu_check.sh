#!/usr/bin/env bash
# The one prepared GPU check (issue 7). On an offline machine with an NVIDIA GPU and the image's
# CUDA PyTorch: install the carried wheels (scripts/prepare_gpu_wheels.sh), then benchmark
# upstream vs optimized on the full-size random model in float32, float16 and bfloat16, recording
# the attention kernel that ran, peak CUDA memory, TTFA and RTF, into one results file.
#
#   scripts/gpu_check.sh            # on the GPU machine (about 5-8 minutes)
#   scripts/gpu_check.sh --dry-run  # here, on CPU: tiny model, a few tokens, no install (a test runs this)
#   GPU_CHECK_POLICIES="bfloat16" ... # only some of the three policies
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0; [[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${GPU_CHECK_OUT:-results/gpu_check.json}
if [[ $DRY == 1 ]]; then
    PY=${PYTHON:-.venv/bin/python}; MODEL=tiny; DEVICE=cpu; TOKENS=8; REPEATS=1
else
    python3 -m venv --system-site-packages /tmp/gpu-venv
    PY=/tmp/gpu-venv/bin/python
    $PY -m pip install --quiet --no-index --no-deps gpu-wheels/*.whl
    $PY -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
    MODEL=random; DEVICE=cuda; TOKENS=${GPU_CHECK_TOKENS:-150}; REPEATS=2
fi
TMP=$(mktemp -d)
REF=()
if [[ $DRY == 1 ]]; then  # a 2 s voice keeps the dry run short (S3Gen re-encodes the prompt every call)
    $PY -c "import sys; from tts_workbench.sources import make_reference_wav; make_reference_wav(sys.argv[1], seconds=2)" "$TMP/ref.wav"
    REF=(--reference "$TMP/ref.wav")
fi
POLICIES=${GPU_CHECK_POLICIES:-float32 float16 bfloat16}
for policy in $POLICIES; do
    echo "== $policy" >&2
    $PY -m tts_workbench.cli bench --model $MODEL --device $DEVICE --tokens $TOKENS --repeats $REPEATS \
        --configs upstream,optimized --dtype $policy "${REF[@]}" --json --out "$TMP/$policy" > "$TMP/$policy.json"
    $PY -c "import json,sys; from tts_workbench.bench import format_bench; print(format_bench(json.load(open(sys.argv[1]))))" "$TMP/$policy.json" >&2
done
mkdir -p "$(dirname "$OUT")"
$PY - "$TMP" "$OUT" "$DRY" $POLICIES <<'PY'
import json, sys
from pathlib import Path
tmp, out, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
runs = {p: json.loads((tmp / f"{p}.json").read_text()) for p in sys.argv[4:]}
first = next(iter(runs.values()))
result = {
    "what": "scripts/gpu_check.sh: upstream vs optimized, full-size random weights" if not dry
    else "DRY RUN on CPU with the tiny model: not a GPU result",
    "environment": first["environment"],
    "runs": {p: {"policy": r["optimized_policy"], "attention_kernels_optimized": r["attention_kernels_optimized"],
                 "summary": r["summary"]} for p, r in runs.items()},
}
out.write_text(json.dumps(result, indent=2))
print(f"wrote {out}")
PY
rm -rf "$TMP"
