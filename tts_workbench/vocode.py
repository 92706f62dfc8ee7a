"""S3Gen calls with exact token ids: flow matching (tokens → mel) and the HiFT vocoder (mel → wav).

Upstream ``S3Gen.forward`` casts *every* tensor of the reference dict to the model dtype, in
place, integer token ids included. In bfloat16 only integers up to 256 are exact (float16: 2048),
so a half-precision S3Gen silently rounds the reference prompt's speech tokens (ids up to 6560)
and its length (a 10 s prompt has ~250 tokens; bfloat16 turns 267 into 268, and the flow fails
with a size mismatch). These functions call the same flow and vocoder modules with the ids kept
as ``long`` and only the float tensors in the model dtype, and without mutating the caller's
dict.
"""

from __future__ import annotations

from typing import Any

import torch
from chatterbox.models.s3gen import S3Gen

# Integer entries of the reference dict. After one upstream ``S3Gen.forward`` in float32 they
# are float32 in the caller's dict (exact up to 2**24, so they round back exactly).
TOKEN_KEYS = ("prompt_token", "prompt_token_len")


def cast_gen(gen: dict[str, Any], dtype: torch.dtype, device: torch.device | str) -> dict[str, Any]:
    """S3Gen's reference dict with float tensors in ``dtype``, token ids and lengths ``long``."""
    out = {}
    for k, v in gen.items():
        if torch.is_tensor(v):
            integer = k in TOKEN_KEYS or not v.is_floating_point()
            v = v.round().to(device=device, dtype=torch.long) if integer else v.to(device=device, dtype=dtype)
        out[k] = v
    return out


def flow_mels(
    s3gen: S3Gen,
    tokens: torch.Tensor,
    gen: dict[str, Any],
    finalize: bool = True,
    n_timesteps: int = 10,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mel frames (1, 80, 2·tokens) for speech ``tokens`` after the reference prompt in ``gen``.

    ``finalize=False`` drops the last ``pre_lookahead_len`` tokens' frames, as upstream streaming
    does, because their right context has not arrived yet. ``noise`` (1, 80, 2·tokens) replaces
    the flow-matching start noise of the generated frames (upstream draws it afresh every call),
    so windows of one utterance can share one noise track.
    """
    dtype, device = s3gen.dtype, s3gen.device
    ref = cast_gen(gen, dtype, device)
    tokens = torch.atleast_2d(tokens).to(device=device, dtype=torch.long)
    with torch.inference_mode():
        mels, _ = s3gen.flow.inference(
            token=tokens,
            token_len=torch.tensor([tokens.size(1)], device=device),
            finalize=finalize,
            n_timesteps=n_timesteps,
            noised_mels=None if noise is None else noise.to(device=device, dtype=dtype),
            meanflow=s3gen.meanflow,
            **ref,
        )
    return mels


def vocoder(
    s3gen: S3Gen, mels: torch.Tensor, cache_source: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """HiFT: waveform (1, samples) in float32 and the excitation source (for ``cache_source``)."""
    if cache_source is None:
        cache_source = torch.zeros(1, 1, 0, device=mels.device)
    with torch.inference_mode():
        wav, source = s3gen.mel2wav.inference(speech_feat=mels, cache_source=cache_source)
    return wav.float(), source


def fade_in(s3gen: S3Gen, wav: torch.Tensor) -> None:
    """Upstream's fade-in over the first 40 ms of ``wav`` (..., samples), in place: it hides the
    spill-over from the reference prompt at the start of every ``S3Gen.inference`` output."""
    with torch.no_grad():
        n = min(len(s3gen.trim_fade), wav.shape[-1])
        wav[..., :n] *= s3gen.trim_fade[:n].to(wav)


def s3gen_inference(s3gen: S3Gen, tokens: torch.Tensor, gen: dict[str, Any]) -> torch.Tensor:
    """Upstream ``S3Gen.inference`` (flow, vocoder, fade-in over the reference spill-over)."""
    with torch.inference_mode():
        wav, _ = vocoder(s3gen, flow_mels(s3gen, tokens, gen))
        fade_in(s3gen, wav)
    return wav
