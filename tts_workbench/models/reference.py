"""The reference voice: a generated voice-like signal, and checks on a user's recording."""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from ..core.constants import SAMPLE_RATE
from ..core.errors import ConfigError, SourceError
from ..core.files import written

# Below this a reference is refused: at 0.02 s the mel extractor's padding fails, and a prompt of
# a few tokens is no voice (the under-1 s note already says conditioning will suffer).
MIN_REFERENCE_S = 0.5
# Below this level (``_voice_level``) a reference is refused as silence: speech, even quiet, is
# tens of dB above it; dither, a DC offset or a lone click in silence are far below, and Turbo's
# loudness normalisation would raise such a click past full scale.
MIN_REFERENCE_DBFS = -60.0
# How much of a reference ``_voice_level`` measures, its loudest frames: five 20 ms frames, more
# than a click lifts (one or two), less than the 0.15 s of voice in make_reference_wav's 0.5 s
# (a pause takes the rest). Before 2026-12-04 a tenth of the file: 0.9 s of speech before 9 s of
# quiet room tone was refused as silence.
LEVEL_S = 0.1
# Upstream prepare_conditionals makes S3Gen's prompt (its mels, tokens and speaker embedding: all of
# the voice's timbre) of a reference's first 10 s (DEC_COND_LEN), T3's speech prompt of its first
# 6 s (Turbo's: 15 s, ENC_COND_LEN); the voice encoder embeds the whole file. Speech only after
# 10 s leaves S3Gen a prompt of silence.
PROMPT_S = 10.0
SPEECH_ASKED = (
    f"a recording of speech of {MIN_REFERENCE_S} s or more (3 s or more for a usable voice; "
    "Turbo asks for more than 5 s)"
)


@functools.lru_cache(maxsize=4)
def _voice_signal(seconds: float, sr: int, seed: int) -> np.ndarray:
    """``make_reference_wav``'s samples (float32), made once a process for each length, rate and
    seed: every command without ``--reference`` makes the 10 s voice (0.2 s of arithmetic)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = 130 + 25 * np.sin(2 * np.pi * 0.4 * t) + 10 * np.sin(2 * np.pi * 2.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = [(700, 130), (1220, 70), (2600, 160)]
    wav = np.zeros(n)
    for k in range(1, 30):
        fk = k * f0
        gain = sum(np.exp(-0.5 * ((fk - fc) / bw) ** 2) for fc, bw in formants) + 0.3 / k
        wav += gain * np.sin(k * phase)
    syllable = 0.5 * (1 - np.cos(2 * np.pi * 4.0 * t))  # ~4 syllables per second
    pauses = np.ones(n)
    for start in rng.uniform(0, seconds - 0.5, size=max(1, int(seconds / 3))):
        pauses[int(start * sr) : int((start + 0.35) * sr)] = 0.0
    wav = wav * syllable * pauses + 0.003 * rng.standard_normal(n)
    signal = (0.5 * wav / max(1e-9, float(np.abs(wav).max()))).astype(np.float32)
    signal.flags.writeable = False  # shared by every later call
    return signal


def make_reference_wav(path: str | Path, seconds: float = 10.0, sr: int = SAMPLE_RATE, seed: int = 0) -> Path:
    """Write a deterministic voice-like signal: harmonics of a gliding pitch under formant
    peaks, syllable envelopes and pauses. Enough to drive the real conditioning path."""
    if seconds < MIN_REFERENCE_S:  # its pauses need the time, and a shorter reference is refused
        raise ConfigError(
            f"cannot make a {seconds} s reference: make_reference_wav makes at least {MIN_REFERENCE_S} s "
            "(what check_reference accepts); give more seconds"
        )
    wav = _voice_signal(float(seconds), sr, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed: a process reading the same path (notebooks run side by side)
    # sees the old file or the new one, never half of one.
    return written(path, lambda partial: sf.write(str(partial), wav, sr, format="WAV"))


@contextmanager
def generated_voice(path: str | Path, seed: int = 0) -> Iterator[Path]:
    """``make_reference_wav`` in a temporary folder for the block to prepare a voice from and
    check a request with; copied to ``path`` only when the block ends without an error, so a
    command refused inside it leaves no voice (and no folder) where its output would go."""
    with tempfile.TemporaryDirectory(prefix="tts-workbench-voice-") as folder:
        made = make_reference_wav(Path(folder) / "reference.wav", seed=seed)
        yield made
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        written(path, lambda partial: shutil.copyfile(made, partial))


def _voice_level(data: np.ndarray, sr: int) -> float:
    """The level in dBFS of ``data`` (samples, channels) as a voice: in its mono mix (what upstream
    conditions on) with the DC offset removed, the RMS that its loudest ``LEVEL_S`` of 20 ms
    frames reach. Not the RMS of the whole: a lone click lifts that, not this. A fixed duration,
    not a share of the file: a short phrase in a long quiet recording still counts."""
    mono = data.astype(np.float64).mean(axis=1)
    mono -= mono.mean()
    frame = max(1, sr // 50)
    frames = np.pad(mono, (0, -len(mono) % frame)).reshape(-1, frame)
    rms = np.sort(np.sqrt(np.mean(frames**2, axis=1)))[::-1]
    loudest = float(rms[min(len(rms), round(LEVEL_S * sr / frame)) - 1])
    return 20 * float(np.log10(loudest)) if loudest > 0 else float("-inf")


@dataclass
class ReferenceInfo:
    """What was done to a user's reference audio before conditioning."""

    path: str
    seconds: float  # rounded to the ms, for reports (``frames`` / ``sample_rate`` is exact)
    sample_rate: int
    channels: int
    notes: list[str]
    frames: int


def reference_line(ref: dict[str, Any]) -> str:
    """A report's line for a reference (``ReferenceInfo`` as a dict): its length, rate and what
    was done to it."""
    notes = "; ".join(ref["notes"]) or "used as is"
    return f"{ref['path']} ({ref['seconds']} s, {ref['sample_rate']} Hz): {notes}"


def check_reference(path: str | Path) -> ReferenceInfo:
    """Validate reference audio; raise SourceError naming the problem.

    Stereo and other sample rates are accepted (upstream's librosa.load mixes to mono and
    resamples); the returned notes say so.
    """
    path = Path(path)
    if not path.exists():
        raise SourceError(f"reference audio {path} does not exist")
    try:
        data, sr = sf.read(str(path), always_2d=True, dtype="float32")
    except (sf.LibsndfileError, RuntimeError) as e:
        raise SourceError(
            f"reference audio {path} is not a readable audio file ({e}); give a WAV/FLAC file"
        ) from e
    if data.shape[0] == 0:
        raise SourceError(f"reference audio {path} is empty (0 samples); give {SPEECH_ASKED}")
    if not np.all(np.isfinite(data)):
        raise SourceError(
            f"reference audio {path} contains NaN or infinite samples; re-export the recording as "
            "16-bit PCM WAV, or remove those samples"
        )
    seconds = data.shape[0] / sr
    # Before the level: in a clip of LEVEL_S's five frames or fewer (0.1 s or less) _voice_level
    # reads the quietest frame, and a loud clip was refused as silence.
    if seconds < MIN_REFERENCE_S:
        raise SourceError(
            f"reference audio {path} is too short ({seconds:.2f} s, under {MIN_REFERENCE_S} s); "
            f"give {SPEECH_ASKED}"
        )
    level = _voice_level(data, sr)
    if level < MIN_REFERENCE_DBFS:
        if not np.any(data):
            measured = "all zeros"
        else:
            measured = (
                f"its level is {level:.0f} dBFS, under {MIN_REFERENCE_DBFS:.0f} dBFS: the RMS that its "
                f"loudest {LEVEL_S} s of 20 ms frames reach, in its mono mix without DC offset"
            )
        raise SourceError(
            f"reference audio {path} is silence ({measured}); give a recording of speech "
            "(check the input level; stereo channels in opposite phase cancel out in the mono mix)"
        )
    prompt = int(PROMPT_S * sr)  # measured apart only where the file is longer than it
    if data.shape[0] > prompt and _voice_level(data[:prompt], sr) < MIN_REFERENCE_DBFS:
        # (before 2026-12-04 the whole file was measured: a voice made of room tone passed)
        raise SourceError(
            f"reference audio {path} is silence in its first {PROMPT_S:g} s and speaks only after them, "
            "so S3Gen's prompt, the voice's whole timbre reference, would be silence (T3's speech prompt "
            "is the first 6 s, Turbo's 15 s; the voice encoder hears all of it): trim the silence before "
            "the speech"
        )
    notes = []
    if data.shape[1] > 1:
        notes.append(f"mixed {data.shape[1]} channels to mono")
    if sr != SAMPLE_RATE:
        notes.append(f"resampled {sr} Hz to {SAMPLE_RATE} Hz (S3Gen) and 16000 Hz (tokenizer, voice encoder)")
    if seconds < 1.0:
        notes.append(f"only {seconds:.2f} s long: conditioning quality will suffer")
    # A float file can hold samples past full scale, which upstream uses as they are (an integer
    # file cannot); a little past it is a resampler's overshoot, far past it a file never scaled.
    if (peak := float(np.abs(data).max())) > 2.0:
        notes.append(f"samples reach {peak:.1f}, past full scale (1.0): used as they are, as upstream "
                     "does; scale the recording to full scale if it was not meant so")  # fmt: skip
    return ReferenceInfo(str(path), round(seconds, 3), sr, data.shape[1], notes, data.shape[0])
