#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on an offline GPU machine into gpu-wheels/
# (git-ignored). The GPU image already has CUDA torch, torchaudio, numpy, safetensors,
# huggingface-hub, tokenizers, matplotlib, psutil, tqdm, tensorboard; these are the rest of what
# chatterbox-tts needs, pinned as in requirements.lock, for the image's Python (3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON_VERSION:-3.12}
rm -rf gpu-wheels && mkdir -p gpu-wheels
pins=$(grep -E '^(setuptools|decorator|tokenizers|chatterbox-tts|s3tokenizer|resemble-perth|conformer|diffusers|transformers|librosa|soxr|audioread|soundfile|pooch|omegaconf|antlr4-python3-runtime|pyloudnorm|future|einops|onnx)==' requirements.lock)
# shellcheck disable=SC2086
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d gpu-wheels $pins || python3 -m pip download --quiet --no-deps -d gpu-wheels $pins
du -sh gpu-wheels && ls gpu-wheels
