"""Audio input of the worker apps (speech, Canary, diarization): an upload decoded to 16 kHz
mono float32 under a duration cap, so that a worker's memory stays bounded whatever is sent.

A 25 MiB FLAC of silence holds days of audio, which decodes to tens of GB of samples. So the
duration is checked before decoding:

1. the container's header says how long the audio is (`header_seconds`: the stream's
   duration, else the container's): past the cap the upload is refused at once, nothing is
   decoded;
2. where the header does not say (a stream written to a pipe, say), one pass decodes and
   counts the samples without keeping them (memory flat), and stops as soon as the count
   passes the cap;
3. the decoding pass that keeps the samples stops as soon as it passes the cap too: a header
   that understates the length (a FLAC whose STREAMINFO says 1 s over hours of frames) costs
   at most the cap's worth of memory, never more.

`decode_capped` raises `AudioTooLong` (each app answers 413 in the OpenAI error shape),
`NoAudioStream`, and PyAV's own errors for what FFmpeg cannot read (each app words its 400).
This module needs PyAV and numpy only, and imports nothing else of modelhost.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16_000
DEFAULT_MAX_SECONDS = 4 * 3600.0

Audio = npt.NDArray[np.float32]


class AudioTooLong(Exception):
    """The upload is longer than the cap: `seconds` (what the header says, or, when only
    decoding could tell, None: more than the cap) against `limit`."""

    def __init__(self, seconds: float | None, limit: float) -> None:
        self.seconds = seconds
        self.limit = limit
        length = f"{seconds:.0f} s" if seconds is not None else f"more than {limit:g} s"
        self.message = f"audio of {length} exceeds the limit of {limit:g} s"
        super().__init__(self.message)


class NoAudioStream(Exception):
    """The file opened, but holds no audio stream (a video without sound, an image...)."""


def cap_argument(value: str) -> float:
    """`--max-audio-seconds`: a positive number of seconds; 0, `none` or `inf`: no cap."""
    if value.strip().lower() in ("", "none", "inf", "0"):
        return math.inf
    seconds = float(value)
    if not seconds > 0:
        raise ValueError(f"--max-audio-seconds must be positive, not {value!r}")
    return seconds


def header_seconds(container: Any, stream: Any) -> float | None:
    """How long the first audio stream is by the container's header, before decoding; None
    when it does not say. (PyAV: `stream.duration` in `stream.time_base` units, else
    `container.duration` in microseconds. For a few formats FFmpeg estimates the latter from
    the bitrate: good enough to refuse hours, and decoding stays capped anyway.)"""
    if stream.duration is not None and stream.duration > 0 and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return float(container.duration) / 1_000_000
    return None


def probe_seconds(path: str | Path) -> float | None:
    """`header_seconds` of a file (NoAudioStream if it has no audio)."""
    import av

    with av.open(str(path), metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise NoAudioStream(str(path))
        return header_seconds(container, container.streams.audio[0])


def _frames(container: Any, skip_invalid: bool) -> Iterator[Any]:
    import av

    decoded = container.decode(audio=0)
    while True:
        try:
            frame = next(decoded)
        except StopIteration:
            return
        except av.error.InvalidDataError:  # a damaged packet: skip it, as faster-whisper
            if not skip_invalid:
                raise
            continue
        yield frame


def count_seconds(path: str | Path, max_seconds: float, skip_invalid: bool = True) -> float:
    """Decode without keeping anything, counting the audio's duration; AudioTooLong as soon as
    it passes `max_seconds`. Memory stays flat: one decoded frame at a time."""
    import av

    seconds = 0.0
    with av.open(str(path), metadata_errors="ignore") as container:
        for frame in _frames(container, skip_invalid):
            seconds += frame.samples / (frame.sample_rate or SAMPLE_RATE)
            if seconds > max_seconds:
                raise AudioTooLong(None, max_seconds)
    return seconds


def decode_capped(path: str | Path, max_seconds: float | None = DEFAULT_MAX_SECONDS,
                  sample_rate: int = SAMPLE_RATE, skip_invalid: bool = True) -> Audio:
    """Any container/codec FFmpeg reads → mono float32 in [-1, 1) at `sample_rate`, refusing
    (AudioTooLong) audio longer than `max_seconds` (None or inf: no cap) before decoding it
    where the header says how long it is, and as soon as decoding passes it otherwise.

    Damaged packets are skipped when `skip_invalid` (faster-whisper's behaviour), else
    av.error.InvalidDataError is raised. Memory: 2 bytes a sample while decoding (s16
    chunks), then the float32 result filled chunk by chunk (the chunks freed as they go)."""
    import av

    cap = math.inf if max_seconds is None else max_seconds
    with av.open(str(path), metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise NoAudioStream(str(path))
        known = header_seconds(container, container.streams.audio[0])
    if known is not None and known > cap:
        raise AudioTooLong(known, cap)
    if known is None and math.isfinite(cap):
        count_seconds(path, cap, skip_invalid)
    max_samples = math.inf if not math.isfinite(cap) else math.floor(cap * sample_rate) + 1
    resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
    chunks: list[npt.NDArray[np.int16]] = []
    total = 0

    def keep(frames: list[Any]) -> None:
        nonlocal total
        for out in frames:
            chunk = np.asarray(out.to_ndarray(), dtype=np.int16).reshape(-1)
            total += chunk.size
            if total > max_samples:
                raise AudioTooLong(None, cap)
            chunks.append(chunk)

    with av.open(str(path), metadata_errors="ignore") as container:
        for frame in _frames(container, skip_invalid):
            frame.pts = None  # the resampler checks timestamps; a gap must not stop decoding
            keep(resampler.resample(frame))
        keep(resampler.resample(None))
    audio = np.empty(total, dtype=np.float32)
    at = 0
    chunks.reverse()
    while chunks:
        chunk = chunks.pop()
        audio[at:at + chunk.size] = chunk
        at += chunk.size
    audio /= 32768.0
    return audio
