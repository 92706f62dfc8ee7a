"""Playback widgets: state, and the audio they hold is a valid WAV of the right rate and length."""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from tts_workbench.core.errors import ConfigError
from tts_workbench.instruments.latency import ChunkMetrics
from tts_workbench.interface import playback
from tts_workbench.interface.playback import StreamPlayer, ab_compare, mono, seam_figure, wav_bytes


def _metrics(i: int, at: float, audio: float) -> ChunkMetrics:
    return ChunkMetrics(i, at, 25, 0, 0.1, 0.2, 0.1, audio, 500, 0, 50, 1)


def test_wav_bytes_round_trip() -> None:
    wav = np.sin(np.linspace(0, 100, 12000)).astype(np.float32) * 0.5
    data, sr = sf.read(io.BytesIO(wav_bytes(wav, 24000)))
    assert sr == 24000 and len(data) == 12000
    assert np.abs(data - wav).max() < 1e-4  # 16-bit PCM


def test_wav_bytes_silences_nan_samples() -> None:
    # A NaN sample (a model whose half-precision run overflowed) was cast to -32768: a full-scale
    # click. It is silence now; infinities still clip to full scale.
    wav = np.array([0.5, np.nan, -2.0, np.inf, -np.inf, np.nan], np.float32)
    data, _ = sf.read(io.BytesIO(wav_bytes(wav, 24000)))
    assert data.tolist() == pytest.approx([0.5, 0.0, -1.0, 1.0, -1.0, 0.0], abs=1e-4)


def test_integer_pcm_plays_at_its_own_level() -> None:
    # int16 (scipy's wavfile.read, soundfile's dtype="int16") was read as floats and clipped: a
    # quiet sine played as a full-scale square wave. Unsigned 8-bit WAV is silent at 128.
    pcm16 = np.array([16384, -16384, 0, -32768], np.int16)
    data, _ = sf.read(io.BytesIO(wav_bytes(pcm16, 24000)))
    assert data.tolist() == pytest.approx([0.5, -0.5, 0.0, -1.0], abs=1e-4)
    assert wav_bytes(torch.from_numpy(pcm16), 24000) == wav_bytes(pcm16, 24000)
    assert mono(np.array([128, 192, 0], np.uint8)).tolist() == pytest.approx([0.0, 0.5, -1.0])
    assert mono(np.array([1 << 30], np.int32)).tolist() == pytest.approx([0.5])


@pytest.mark.parametrize("rate", [24000.0, 0, "24000"])
def test_a_player_refuses_a_rate_no_wav_header_holds(rate: object) -> None:
    # 24000.0 was taken, then the first add failed in soundfile after keeping its chunk
    with pytest.raises(ConfigError, match="sample_rate must be a whole number"):
        StreamPlayer(sample_rate=rate)  # type: ignore[arg-type]
    assert StreamPlayer(sample_rate=np.int64(16000)).sample_rate == 16000


def test_stream_player_marks_underruns() -> None:
    player = StreamPlayer(24000)
    player.add(np.zeros(24000, np.float32), _metrics(0, 1.0, 1.0))  # plays until 2.0
    player.add(np.zeros(12000, np.float32), _metrics(1, 3.0, 0.5))  # arrives 1 s late
    assert len(player.rows.children) == 2
    label = player.rows.children[1].children[0].value
    assert "underrun 1.00 s" in label and "underrun" not in player.rows.children[0].children[0].value
    audio = player.rows.children[1].children[1]
    assert audio.format == "wav" and not audio.autoplay and not audio.loop
    assert sf.info(io.BytesIO(audio.value)).frames == 12000
    wav = player.finish()
    assert len(wav) == 36000 and sf.info(io.BytesIO(player.full.children[1].value)).frames == 36000
    assert "1 underrun so far" in player.status.value
    assert player.static()["index"].tolist() == [0, 1]  # the static rendering has both rows


def test_a_player_at_another_rate_writes_it_in_every_header() -> None:
    player = StreamPlayer(16000)
    player.add(np.zeros(16000, np.float32), _metrics(0, 0.5, 1.0))
    chunk = player.rows.children[0].children[1].value
    player.finish()
    whole = player.full.children[1].value
    played = re.search(r"base64,([^\"]+)", player._static_bundle()["text/html"])
    assert played is not None
    for wav in (chunk, whole, base64.b64decode(played.group(1))):
        assert sf.info(io.BytesIO(wav)).samplerate == 16000
    assert "whole utterance: 1.00 s of audio" in player._static_bundle()["text/plain"]


def test_only_the_chunk_that_came_late_is_marked() -> None:
    # (before: a second chunk arriving at the late one's moment was marked late too)
    player = StreamPlayer(24000)
    for m in (_metrics(0, 1.0, 1.0), _metrics(1, 3.0, 0.5), _metrics(2, 3.0, 0.5)):
        player.add(np.zeros(12000, np.float32), m)
    labels = [row.children[0].value for row in player.rows.children]
    assert "underrun 1.00 s" in labels[1] and "underrun" not in labels[2] + labels[0]


def test_the_stream_player_keeps_its_title() -> None:
    # The first chunk's status replaced the title, and the table a saved notebook keeps had none:
    # notebooks 05 and 09 kept unlabeled tables, one per stream.
    player = StreamPlayer(24000, title="naive <25>")
    player.add(np.zeros(24000, np.float32), _metrics(0, 1.0, 1.0))
    assert player.status.value.startswith("<b>naive &lt;25&gt;</b>: 1 chunk, 0 underruns so far")
    player.finish()
    static = player._static_bundle()
    assert static["text/plain"].splitlines()[0] == "naive <25>"
    assert "<b>naive &lt;25&gt;</b>" in static["text/html"].split("<table")[0]


def test_ab_compare_and_seam_figure(capsys: pytest.CaptureFixture[str]) -> None:
    a, b = np.zeros(48000, np.float32), np.ones(48000, np.float32) * 0.1
    w = ab_compare({"naive": a, "buffered": b}, {"naive": [24000], "buffered": [12000, 36000]})
    assert [p.children[0].value for p in w.children[0].children] == ["<b>naive</b>", "<b>buffered</b>"]
    # the seams' figure is in the widget as a picture, outside a kernel too (before 2026-12-04 the
    # widget held nothing there and "Figure(360x180)" went to stdout)
    [shown] = w.children[1].outputs
    assert "image/png" in shown["data"] and capsys.readouterr().out == ""
    fig = seam_figure({"naive": a, "buffered": b}, {"naive": [24000], "buffered": [12000, 36000]})
    assert len(fig.axes) == 4
    # each seam zoomed on its default ±20 ms, in ms from the seam: 480 samples either side at 24 kHz
    x = np.asarray(fig.axes[0].get_lines()[0].get_xdata(), float)
    assert (len(x), x[0]) == (960, -20.0) and 19.9 < x[-1] < 20


def test_ab_compare_plays_and_shows_its_figure_where_no_widget_renders() -> None:
    # A saved notebook kept only the widget and its name, "VBox(children=...": GitHub's viewer,
    # which renders no widgets, showed neither the versions' audio nor the seams' figure.
    a, b = np.full(48000, 0.1, np.float32), np.full(24000, -0.1, np.float32)
    w = ab_compare({"naive": a, "buffered": b}, {"naive": [24000], "buffered": [12000]}, 24000)
    bundle = w._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == w.model_id
    assert "VBox(" not in bundle["text/plain"]
    assert "naive: 2.00 s" in bundle["text/plain"] and "buffered: 1.00 s" in bundle["text/plain"]
    markup = bundle["text/html"]
    assert markup.count("<audio") == 2 and "data:image/png;base64," in markup
    played = [base64.b64decode(s) for s in re.findall(r'"data:audio/wav;base64,([^"]+)"', markup)]
    assert played == [wav_bytes(a, 24000), wav_bytes(b, 24000)]  # what the widgets play


def test_a_waveform_shaped_as_generate_returns_it_plays_as_one_channel() -> None:
    # Pipeline.generate returns a (1, samples) tensor: soundfile took it as one frame of that many
    # channels (ab_compare failed with "Format not recognised", wav_bytes wrote 500 channels of one
    # sample) and ab_compare's duration line said 0.00 s.
    wav = np.full((1, 500), 0.25, np.float32)
    info = sf.info(io.BytesIO(wav_bytes(wav, 24000)))
    assert (info.channels, info.frames) == (1, 500)
    assert wav_bytes(torch.from_numpy(wav), 24000) == wav_bytes(wav[0], 24000)
    w = ab_compare(
        {"one-shot": torch.zeros(1, 48000), "stream": np.zeros(48000, np.float32)}, {"stream": [24000]}
    )
    assert w.static["text/plain"].splitlines() == ["one-shot: 2.00 s, 0 seams", "stream: 2.00 s, 1 seam"]
    player = StreamPlayer(24000)
    player.add(np.zeros((1, 2400), np.float32), _metrics(0, 1.0, 0.1))
    assert player.finish().shape == (2400,)
    with pytest.raises(ConfigError, match=r"shape \(2, 100\).*\(samples,\) or \(1, samples\)"):
        wav_bytes(np.zeros((2, 100), np.float32), 24000)


def test_outside_a_kernel_the_player_shows_its_static_table_and_the_utterance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the docstrings say: ``static()`` holds index, arrival, audio seconds and RTF only,
    # and displaying the player outside a Jupyter kernel shows it and the whole utterance, each
    # as text a terminal prints (before 2026-12-04 an HTML and an Audio object: a terminal
    # printed "<IPython.core.display.HTML object>" and "<IPython.lib.display.Audio object>").
    player = StreamPlayer(24000)
    player.add(np.full(24000, 0.1, np.float32), _metrics(0, 1.0, 1.0))
    player.add(np.full(12000, 0.1, np.float32), _metrics(1, 3.0, 0.5))
    table = player.static()
    assert list(table.columns) == ["index", "emitted_s", "audio_s", "rtf"]
    shown: list[Any] = []
    monkeypatch.setattr(playback, "display", lambda x, **_k: shown.append(x))
    player._ipython_display_()  # pytest runs no Jupyter kernel
    [bundle] = shown
    assert bundle["text/plain"].splitlines()[1].split() == ["index", "emitted_s", "audio_s", "rtf"]
    assert "object>" not in bundle["text/plain"] and "<table" in bundle["text/html"]
    assert bundle["text/plain"].endswith("whole utterance: 1.50 s of audio (player.finish() returns it)")
    assert "<audio" in bundle["text/html"]


def test_in_a_kernel_the_finished_player_is_shown_again_with_its_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A saved notebook keeps the text shown beside the widget: before 2026-12-04 its name,
    # "VBox(children=(HTML(value='...: waiting for the first chunk'), ...", what GitHub showed.
    updates: list[dict[str, Any]] = []

    class Handle:
        def update(self, obj: dict[str, Any], raw: bool = False) -> None:
            assert raw
            updates.append(obj)

    shown: list[dict[str, Any]] = []

    def display(obj: dict[str, Any], raw: bool = False, display_id: bool = False) -> Handle:
        assert raw and display_id
        shown.append(obj)
        return Handle()

    monkeypatch.setattr(playback, "_has_frontend", lambda: True)
    monkeypatch.setattr(playback, "display", display)
    player = StreamPlayer(24000)
    player._ipython_display_()
    player.add(np.full(24000, 0.1, np.float32), _metrics(0, 1.0, 1.0))
    player.finish()
    [first], [last] = shown, updates
    model = player.widget.model_id
    for bundle in (first, last):  # the widget in a kernel, the table where no widget renders
        assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == model
        assert "VBox(" not in bundle["text/plain"]
    assert "whole utterance: 1.00 s" in last["text/plain"] and "<audio" in last["text/html"]


def test_outside_a_kernel_the_utterance_plays_the_samples_the_widget_plays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # IPython's Audio of an array scales it to full scale (a quiet chunk played loud, one NaN
    # sample silenced everything); the widget plays ``wav_bytes``: now both do.
    player = StreamPlayer(24000)
    player.add(np.full(2400, 0.01, np.float32), _metrics(0, 1.0, 0.1))
    player.add(np.array([0.01, np.nan, -0.01], np.float32), _metrics(1, 1.1, 0.1))
    shown: list[Any] = []
    monkeypatch.setattr(playback, "display", lambda x, **_k: shown.append(x))
    player._ipython_display_()
    played = base64.b64decode(re.search(r'base64,([^"]+)"', shown[0]["text/html"]).group(1))  # type: ignore[union-attr]
    assert played == wav_bytes(player.finish(), 24000) == player.full.children[1].value
