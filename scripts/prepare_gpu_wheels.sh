#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on an offline GPU machine into gpu-wheels/
# (git-ignored). The GPU image already has CUDA torch, torchaudio, numpy, safetensors,
# huggingface-hub, tokenizers, matplotlib, psutil, tqdm, tensorboard; these are the rest of what
# chatterbox-tts needs, pinned as in requirements.lock, for the image's Python (3.12): 54.3 MB
# (2026-12), under the device tool's 64 MiB (67.1 MB) with the checkout's under 11 MB of tracked
# files (10.13 MB on 2026-12-07; --check-size counts them).
# What GPU_CHECK_SERVE=1 needs beyond the image (which has httpx, prometheus_client, aiohttp and the
# rest of Ray's core needs) goes apart, into gpu-serve/ (--serve): ray 2.60.0's wheel alone is
# 79.3 MB, over a call's whole limit, so scripts/slim_wheel.py drops what serving one deployment on a
# local Ray never uses (its Java jar, the dashboard's web client, RLlib, Data, Tune, Train, LLM):
# ~40 MB; with fastapi, starlette, uvicorn, pydantic, jsonschema, opentelemetry-api and grpcio-reflection
# (Ray Serve imports it), and grpcio, protobuf, typing_extensions and annotated-doc at the lock's
# versions (what the others need at least; the image's versions are not known here), the folder is
# ~51 MB. They go ahead of the image's packages for every step of that call. It cannot
# travel in the same call as gpu-wheels/: docs/gpu-check.md plans two calls on one warm machine.
#   scripts/prepare_gpu_wheels.sh                    # download, then check the size (below)
#   scripts/prepare_gpu_wheels.sh --serve            # the serving wheels into gpu-serve/, then its size
#   scripts/prepare_gpu_wheels.sh --check-size [DIR] # only check DIR's wheels (default gpu-wheels)
#   GPU_PYTHON_VERSION=3.11 scripts/prepare_gpu_wheels.sh  # wheels for another Python (default 3.12)
# The size check adds the checkout's tracked and untracked-not-ignored files (what a call sends besides
# the carried wheels) and warns, exit status 1, when together they reach 64 MiB: such a call is refused.
set -euo pipefail
cd "$(dirname "$0")/.."

check_size() {  # check_size DIR: the wheels in DIR plus the checkout, against the 64 MiB a call carries
    local wheels checkout limit=$((64 * 1048576))
    if ! compgen -G "$1/*.whl" > /dev/null; then  # du alone would say only "cannot access"
        echo "no wheels in $1: run scripts/prepare_gpu_wheels.sh first" >&2
        return 1
    fi
    wheels=$(du -cb "$1"/*.whl | tail -1 | cut -f1)
    # du's status is 1 for a tracked file deleted in the work tree: it still sums the others
    checkout=$(git ls-files --cached --others --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) || true
    echo "$1: $((wheels / 1000000)) MB of wheels + $((checkout / 1000000)) MB of the checkout's files" \
        "= $(((wheels + checkout) / 1000000)) MB; a device call carries at most 64 MiB ($((limit / 1000000)) MB) in all"
    if ((wheels + checkout >= limit)); then
        echo "warning: the wheels and the checkout reach 64 MiB together: a call carrying them is refused;" \
            "drop wheels the steps you run do not need, or carry fewer files" >&2
        return 1
    fi
}
if [[ ${1:-} == --check-size ]]; then
    check_size "${2:-gpu-wheels}"
    exit
fi
PY=${GPU_PYTHON_VERSION:-3.12}
download() {  # download DEST NAMES_REGEX [THEN]: the pinned wheels of requirements.lock whose names
    # match, into DEST; THEN (a command) is given the downloaded folder before it replaces DEST
    # Downloaded into a folder beside DEST and swapped in only when every wheel came: a failed
    # download (no network, a pin gone from the index) keeps the wheels there were (before
    # 2026-12-05 gpu-wheels/ was emptied first).
    local new pins plats=()
    new=$(mktemp -d "$1.new.XXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$new'" EXIT
    chmod 755 "$new"  # mkdir's mode, not mktemp's 0700
    pins=$(grep -E "^($2)==" requirements.lock)
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
        plats+=(--platform "$p")
    done
    # No fallback to this machine's Python: a wheel for the wrong Python would only fail over there.
    # shellcheck disable=SC2086
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
        "${plats[@]}" -d "$new" $pins
    [[ -z ${3:-} ]] || "$3" "$new"
    rm -rf "$1" && mv "$new" "$1"
    trap - EXIT
    ls "$1"
    check_size "$1"
}
slim_ray() {  # slim_ray DIR: DIR's Ray wheel without what serving one deployment never imports
    python3 scripts/slim_wheel.py "$1"/ray-*.whl ray/jars ray/dashboard/client/build \
        ray/rllib ray/data ray/tune ray/train ray/llm
}
if [[ ${1:-} == --serve ]]; then
    download gpu-serve 'ray|fastapi|annotated-doc|typing_extensions|starlette|uvicorn|pydantic|pydantic_core|annotated-types|typing-inspection|jsonschema|jsonschema-specifications|referencing|rpds-py|opentelemetry-api|grpcio|grpcio-reflection|protobuf' slim_ray
    exit
fi
# onnx is left out: the image has its own build of it.
download gpu-wheels 'cffi|pycparser|platformdirs|setuptools|decorator|tokenizers|chatterbox-tts|s3tokenizer|resemble-perth|conformer|diffusers|transformers|librosa|soxr|audioread|soundfile|pooch|omegaconf|pyloudnorm|einops'
