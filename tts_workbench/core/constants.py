"""Numbers and names fixed by the Chatterbox models, named once.

S3Gen speaks 25 speech tokens per second at 24 kHz, two mel frames per token; T3's speech
vocabulary has ids up to 6561 + specials, of which only ids below ``SPEECH_VOCAB_SIZE`` can be
vocoded (upstream drops the rest).
"""

from __future__ import annotations

import torch
from chatterbox.models.s3gen.const import S3GEN_SR
from chatterbox.models.s3tokenizer import SPEECH_VOCAB_SIZE

from .errors import ConfigError

# Upstream's example sentence: the default text everywhere, so runs compare.
UPSTREAM_SENTENCE = (
    "Ezreal and Jinx teamed up with Ahri, Yasuo, and Teemo to take down the enemy's Nexus "
    "in an epic late-game pentakill."
)

SAMPLE_RATE: int = S3GEN_SR  # 24000 Hz, S3Gen's output
TOKENS_PER_S = 25  # speech tokens per second of audio
FRAMES_PER_TOKEN = 2  # S3Gen mel frames per speech token
SAMPLES_PER_TOKEN = SAMPLE_RATE // TOKENS_PER_S  # 960
SAMPLES_PER_MS = SAMPLE_RATE // 1000  # 24

# Upstream generate's own token cap: hard-coded as T3's max_new_tokens by the standard and
# multilingual generate, inference_turbo's max_gen_len default (after the prefill's token) in Turbo's.
UPSTREAM_GENERATE_CAP = 1000

# A request's seed, over HTTP (serve's parse_speech) and from the CLI's --seed: 0 to 2**63 - 1,
# torch.manual_seed's non-negative range (an engine in process takes more: decode.checked_seed).
REQUEST_SEEDS = 2**63

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

# Why a run ended at its token cap, said so that it holds for any weights: a report cannot tell
# random weights (every name in builders.MODELS, and folders saved from them) from trained ones.
# Measured by scripts/stop_rate.py: 3 stop tokens in 19,016 sampled on tiny, 1 in 19,814 on turbo-tiny.
RANDOM_NO_STOP = "a model with random weights almost never samples the stop token"

__all__ = [
    "DTYPES",
    "FRAMES_PER_TOKEN",
    "HALF_DTYPES",
    "RANDOM_NO_STOP",
    "REQUEST_SEEDS",
    "SAMPLES_PER_MS",
    "SAMPLES_PER_TOKEN",
    "SAMPLE_RATE",
    "SPEECH_VOCAB_SIZE",
    "TOKENS_PER_S",
    "UPSTREAM_GENERATE_CAP",
    "UPSTREAM_SENTENCE",
    "dtype_name",
    "parse_dtype",
]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` → ``"float16"`` (the spelling used in reports and metadata)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """``"float16"`` → ``torch.float16``; a ConfigError naming the choices for anything else."""
    try:
        return DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}") from None
