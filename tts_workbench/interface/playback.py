"""Listening in Jupyter: a streaming player that shows each chunk as it arrives, and an A/B
widget with the waveforms zoomed on the seams, both ipywidgets. Display the player itself
(``display(player)``): in a kernel it shows the widget, and when it finishes it shows it again
with a table of its chunks and the whole utterance beside it, which is what a saved notebook's
viewer that renders no widgets (GitHub) shows. Outside a kernel (an IPython terminal) it shows
that table and a line saying how much audio the utterance holds. The A/B widget likewise carries
its versions' audio and its figure as HTML, which such a viewer shows in its place."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any, TypeAlias

import ipywidgets as widgets
import numpy as np
import pandas as pd
import soundfile as sf
import torch
from IPython.display import Audio, DisplayHandle, Image, display
from matplotlib.figure import Figure

from ..core.constants import SAMPLE_RATE
from ..core.errors import ConfigError, whole_from_one
from ..instruments.latency import ChunkMetrics, StreamReport, underruns

# What every player here takes: a waveform, or ``Pipeline.generate``'s (1, samples) tensor.
Waveform: TypeAlias = np.ndarray | torch.Tensor


def mono(wav: Waveform) -> np.ndarray:
    """``wav`` (a numpy array or torch tensor of shape (samples,) or (1, samples)) as a 1-D float32
    array, integer PCM (int16 from ``scipy.io.wavfile.read``, say) scaled to [-1, 1]; any other
    shape is refused with ``ConfigError``. soundfile reads a 2-D array as frames by channels: a
    (1, samples) one was a single frame of that many channels."""
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu()  # numpy cannot read CUDA memory, nor bfloat16
        wav = (wav if not wav.is_floating_point() else wav.float()).numpy()
    samples = np.asarray(wav)
    # An integer's samples are in its own range: read as floats, every one past 1 was clipped
    # to full scale (a quiet int16 sine played as a full-scale square wave). 8-bit WAV is
    # unsigned, its silence 128: the middle of the range.
    if np.issubdtype(samples.dtype, np.integer):
        info = np.iinfo(samples.dtype)
        half = (float(info.max) - float(info.min) + 1) / 2
        samples = (samples.astype(np.float64) - (info.min + half)) / half
    samples = samples.astype(np.float32)
    if samples.ndim == 2 and samples.shape[0] == 1:
        return samples[0]
    if samples.ndim != 1:
        raise ConfigError(
            f"a waveform of shape {tuple(samples.shape)} cannot be played: give one channel, "
            "shape (samples,) or (1, samples), as a numpy array or torch tensor"
        )
    return samples


def wav_bytes(wav: Waveform, sample_rate: int) -> bytes:
    """A float waveform (``mono``) as the bytes of a 16-bit PCM WAV file (what every player here
    plays, in a kernel or not): samples clipped to [-1, 1], NaN samples silent."""
    # NaN survives np.clip and libsndfile writes it as -32768, a full-scale click in the player.
    samples = np.nan_to_num(mono(wav), nan=0.0, posinf=1.0, neginf=-1.0)
    buf = io.BytesIO()
    sf.write(
        buf,
        np.clip(samples, -1.0, 1.0),
        sample_rate,
        format="WAV",
        subtype="PCM_16",
    )
    return buf.getvalue()


def audio_widget(wav: Waveform, sample_rate: int) -> widgets.Audio:
    """A player of ``wav`` (as a WAV file's bytes: ``wav_bytes``), not started on its own."""
    return widgets.Audio(value=wav_bytes(wav, sample_rate), format="wav", autoplay=False, loop=False)


def _audio_html(wav: bytes) -> str:
    """An ``<audio>`` element playing the bytes of a WAV file (``wav_bytes``, what the widgets
    play: IPython's own conversion of an array scales it to full scale)."""
    return str(Audio(wav)._repr_html_())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class StreamPlayer:
    """Feed it ``(chunk, metrics)`` as a stream yields them: one row per chunk (index, arrival,
    latency, audio, underrun marker) with that chunk's audio, and the whole utterance at the end."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, title: str = "stream") -> None:
        # a WAV header holds a whole rate: 24000.0 failed at the first add
        refusal = f"sample_rate must be a whole number of samples per second, got {sample_rate!r}"
        self.sample_rate = whole_from_one(sample_rate, refusal)
        self.title = title
        self.chunks: list[np.ndarray] = []
        self.metrics: list[ChunkMetrics] = []
        self.status = widgets.HTML(f"<b>{html.escape(title)}</b>: waiting for the first chunk")
        self.rows = widgets.VBox([])
        self.full = widgets.VBox([])
        self.widget = widgets.VBox([self.status, self.rows, self.full])
        self._shown: DisplayHandle | None = None  # where a kernel showed it (``_ipython_display_``)
        self._gaps_seen = 0  # underruns found before the last chunk came

    def add(self, chunk: Waveform, metrics: ChunkMetrics) -> None:
        """Show one more chunk and its metrics, marking it late where a real-time player ran dry before it."""
        chunk = mono(chunk)  # joined by ``finish``: a (1, samples) chunk would not join the others
        self.chunks.append(chunk)
        self.metrics.append(metrics)
        gaps = underruns([m.emitted_s for m in self.metrics], [m.audio_s for m in self.metrics])
        # a gap new with this chunk is its own (before: any gap ending at its arrival time, so a
        # second chunk arriving at the same moment was marked late too)
        late = gaps[-1] if len(gaps) > self._gaps_seen else None
        self._gaps_seen = len(gaps)
        marker = f" ⚠ underrun {late.gap_s:.2f} s" if late else ""
        label = widgets.HTML(
            f"chunk {metrics.index}: at {metrics.emitted_s:.2f} s, {metrics.audio_s:.2f} s of audio, "
            f"compute {metrics.compute_s:.2f} s (RTF {metrics.rtf:.2f}){marker}"
        )
        self.rows.children = (
            *self.rows.children,
            widgets.HBox([label, audio_widget(chunk, self.sample_rate)]),
        )
        self.status.value = (
            f"<b>{html.escape(self.title)}</b>: {_count(len(self.chunks), 'chunk')}, "
            f"{_count(len(gaps), 'underrun')} so far"
        )

    def finish(self) -> np.ndarray:
        """Show the whole utterance and return it."""
        wav = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        self.full.children = (widgets.HTML("whole utterance:"), audio_widget(wav, self.sample_rate))
        if self._shown is not None:  # what a saved notebook keeps beside the widget: the table now
            self._shown.update(self._bundle(), raw=True)
        return wav

    def static(self) -> pd.DataFrame:
        """The chunks so far without widgets: index, arrival (``emitted_s``), seconds of audio and
        RTF; not the rows' underrun markers, compute seconds or audio. What displaying the player
        outside a Jupyter kernel shows (``_ipython_display_``), and what a saved notebook shows
        where its viewer renders no widgets."""
        chunks = StreamReport("stream", self.metrics).to_frame()[["index", "emitted_s", "audio_s", "rtf"]]
        return chunks.round(2)

    def _static_bundle(self) -> dict[str, str]:
        """The title, ``static()`` and the whole utterance, as text (a terminal) and as HTML
        (playable)."""
        table = self.static()
        text = [self.title, table.to_string(index=False)]
        markup = [f"<p><b>{html.escape(self.title)}</b></p>", table.to_html(index=False)]
        if self.chunks:
            wav = np.concatenate(self.chunks)
            seconds = len(wav) / self.sample_rate
            line = f"whole utterance: {seconds:.2f} s of audio (player.finish() returns it)"
            text.append(line)
            markup.append(f"<p>{line}</p>" + _audio_html(wav_bytes(wav, self.sample_rate)))
        return {"text/plain": "\n".join(text), "text/html": "\n".join(markup)}

    def _bundle(self) -> dict[str, Any]:
        """The widget, with ``_static_bundle`` beside it in place of its name ("VBox(children=...")."""
        return {**self.widget._repr_mimebundle_(), **self._static_bundle()}

    def _ipython_display_(self) -> None:
        """In a kernel the widget, shown with a display id: ``finish`` shows it again, so a saved
        notebook keeps the table of its chunks beside it (before 2026-12-04, the widget's name and
        "waiting for the first chunk"). Outside one, ``_static_bundle`` (before, an HTML and an
        Audio object: a terminal printed their names)."""
        if _has_frontend():
            self._shown = display(self._bundle(), raw=True, display_id=True)
        else:
            display(self._static_bundle(), raw=True)


def seam_figure(
    waves: dict[str, Waveform],
    seams: dict[str, Sequence[int]],
    sample_rate: int = SAMPLE_RATE,
    ms: float = 20.0,
) -> Figure:
    """Each waveform zoomed on its seams (±``ms``), one row per waveform, one column per seam."""
    n = max((len(s) for s in seams.values()), default=0) or 1
    fig = Figure(figsize=(2.6 * n + 1, 1.8 * len(waves)))
    axes = fig.subplots(len(waves), n, squeeze=False)
    half = int(ms * sample_rate / 1000)
    for row, (name, wave) in enumerate(waves.items()):
        wav = mono(wave)
        for col in range(n):
            ax = axes[row][col]
            if col >= len(seams.get(name, ())):
                ax.axis("off")
                continue
            s = seams[name][col]
            lo, hi = max(s - half, 0), min(s + half, len(wav))
            ax.plot((np.arange(lo, hi) - s) * 1000 / sample_rate, wav[lo:hi], lw=0.8)
            ax.axvline(0, color="red", lw=0.6)
            ax.set_title(f"{name}: seam {col + 1}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.supxlabel("ms from the seam", fontsize=8)
    fig.tight_layout()
    return fig


class ABCompare(widgets.VBox):
    """``ab_compare``'s widget, displayed with ``static`` beside it (like ``StreamPlayer``): what a
    saved notebook's viewer that renders no widgets (GitHub) shows in place of "VBox(children=..."."""

    def __init__(self, children: Sequence[widgets.Widget], static: dict[str, str]) -> None:
        super().__init__(children)
        self.static = static

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return {**super()._repr_mimebundle_(**kwargs), **self.static}


def ab_compare(
    waves: dict[str, Waveform], seams: dict[str, Sequence[int]], sample_rate: int = SAMPLE_RATE
) -> ABCompare:
    """Two (or more) versions (``mono``) side by side, each playable, above their waveforms at the
    seams."""
    waves = {k: mono(v) for k, v in waves.items()}  # their lengths in samples, for the lines below
    audio = {k: audio_widget(v, sample_rate) for k, v in waves.items()}
    players = [widgets.VBox([widgets.HTML(f"<b>{html.escape(k)}</b>"), a]) for k, a in audio.items()]
    # The figure as a PNG in the widget itself: ``with Output(): display(fig)`` captures only in a
    # kernel, and outside one printed "Figure(360x180)" to stdout (a script's JSON with it).
    buf = io.BytesIO()
    seam_figure(waves, seams, sample_rate).savefig(buf, format="png")
    plot = widgets.Output()
    plot.append_display_data(Image(data=buf.getvalue(), format="png"))
    lines = [
        f"{k}: {len(v) / sample_rate:.2f} s, {_count(len(seams.get(k, ())), 'seam')}"
        for k, v in waves.items()
    ]
    playable = [
        f"<p><b>{html.escape(line)}</b></p>" + _audio_html(bytes(a.value))  # the widget keeps a memoryview
        for line, a in zip(lines, audio.values(), strict=True)
    ]
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    static = {
        "text/plain": "\n".join(lines),
        "text/html": "\n".join([*playable, f'<img src="data:image/png;base64,{png}" alt="the seams">']),
    }
    return ABCompare([widgets.HBox(players), plot], static)


def _has_frontend() -> bool:
    """True inside a Jupyter kernel (widgets can render); False in a plain Python process."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
