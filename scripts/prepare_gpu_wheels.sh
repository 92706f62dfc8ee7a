#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on an offline GPU machine into gpu-wheels/
# (git-ignored). The GPU image already has CUDA torch, torchaudio, numpy, safetensors,
# huggingface-hub, tokenizers, matplotlib, psutil, tqdm, tensorboard; these are the rest of what
# chatterbox-tts needs, pinned as in requirements.lock, for the image's Python (3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON_VERSION:-3.12}
rm -rf gpu-wheels && mkdir -p gpu-wheels
# onnx is left out: the image has its own build of it.
pins=$(grep -E '^(cffi|pycparser|platformdirs|setuptools|decorator|tokenizers|chatterbox-tts|s3tokenizer|resemble-perth|conformer|diffusers|transformers|librosa|soxr|audioread|soundfile|pooch|omegaconf|antlr4-python3-runtime|pyloudnorm|future|einops)==' requirements.lock)
plats=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
    plats+=(--platform "$p")
done
# No fallback to this machine's Python: a wheel for the wrong Python would only fail over there.
# shellcheck disable=SC2086
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    "${plats[@]}" -d gpu-wheels $pins
du -sh gpu-wheels && ls gpu-wheels
