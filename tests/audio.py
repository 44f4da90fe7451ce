"""Test audio made on the spot: speech synthesized by espeak-ng, joined into recordings, and
the word error rate of a transcript against what was said.

    speak("Hello there.", tmp / "a.wav", voice="en-us+f3")    # 16 kHz mono 16-bit WAV
    spans = concat_wavs([a, b, a], tmp / "talk.wav", gap_seconds=0.6)
    word_error_rate("Hello there.", "hello, there")            # 0.0
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np

SAMPLE_RATE = 16_000
# Two voices that tell speakers apart, for two-speaker recordings.
VOICES = ("en-us+m3", "en-us+f3")


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, path: Path, voice: str = "en-us", speed: int | None = None,
          pitch: int | None = None) -> Path:
    """`text` spoken by espeak-ng into `path`: a 16 kHz mono 16-bit PCM WAV file.

    speed: words per minute (espeak's default is 175); pitch: 0-99 (default 50).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = ["espeak-ng", "-v", voice]
    if speed is not None:
        args += ["-s", str(speed)]
    if pitch is not None:
        args += ["-p", str(pitch)]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "espeak.wav"  # espeak-ng writes 22.05 kHz
        subprocess.run([*args, "-w", str(raw), "--", text], check=True, capture_output=True,
                       timeout=60)
        resample_wav(raw, path)
    return path


def resample_wav(source: Path, dest: Path, rate: int = SAMPLE_RATE) -> Path:
    """Any audio file FFmpeg reads → a mono 16-bit WAV at `rate` (sox when installed, else
    PyAV)."""
    if shutil.which("sox"):
        subprocess.run(["sox", str(source), "-r", str(rate), "-c", "1", "-b", "16", str(dest)],
                       check=True, capture_output=True, timeout=60)
        return dest
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    chunks: list[bytes] = []
    with av.open(str(source)) as container:
        for frame in container.decode(audio=0):
            chunks += [out.to_ndarray().tobytes() for out in resampler.resample(frame)]
    chunks += [out.to_ndarray().tobytes() for out in resampler.resample(None)]
    _write_wav(dest, b"".join(chunks), rate)
    return dest


# Container suffix → the encoder PyAV (its bundled FFmpeg) writes it with.
ENCODERS = {".mp3": "libmp3lame", ".flac": "flac", ".ogg": "libopus", ".webm": "libopus",
            ".m4a": "aac"}


def encode(source: Path, dest: Path, codec: str | None = None) -> Path:
    """Re-encode an audio file into another format (chosen by `dest`'s suffix), with PyAV."""
    codec = codec or ENCODERS[Path(dest).suffix]
    with av.open(str(source)) as inp, av.open(str(dest), "w") as out:
        in_rate = inp.streams.audio[0].rate
        stream = out.add_stream(codec, rate=48_000 if "opus" in codec else in_rate)
        assert isinstance(stream, av.audio.stream.AudioStream)
        stream.layout = "mono"
        for frame in inp.decode(audio=0):
            frame.pts = None
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return Path(dest)


def _write_wav(path: Path, pcm: bytes, rate: int) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)


def wav_duration(path: Path) -> float:
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


def concat_wavs(paths: Sequence[Path], out: Path, gap_seconds: float = 0.5,
                lead_seconds: float = 0.0) -> list[tuple[float, float]]:
    """Join WAV files (all of one rate, mono 16-bit, as `speak` writes them) with
    `gap_seconds` of silence between them (and `lead_seconds` before the first) into `out`.

    Returns where each input lies in `out`, as (start, end) seconds: the reference turns of
    a several-speaker recording.
    """
    if not paths:
        raise ValueError("nothing to concatenate")
    rate: int | None = None
    pcm: list[bytes] = []
    spans: list[tuple[float, float]] = []
    cursor = 0  # in frames
    for i, path in enumerate(paths):
        with wave.open(str(path), "rb") as wav:
            if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
                raise ValueError(f"{path}: expected mono 16-bit PCM")
            if rate is None:
                rate = wav.getframerate()
            elif wav.getframerate() != rate:
                raise ValueError(f"{path}: {wav.getframerate()} Hz, the others {rate} Hz")
            frames = wav.readframes(wav.getnframes())
        silence = round((lead_seconds if i == 0 else gap_seconds) * rate)
        pcm.append(b"\0\0" * silence)
        cursor += silence
        count = len(frames) // 2
        spans.append((cursor / rate, (cursor + count) / rate))
        pcm.append(frames)
        cursor += count
    assert rate is not None
    _write_wav(Path(out), b"".join(pcm), rate)
    return spans


def silence(path: Path, seconds: float, rate: int = SAMPLE_RATE) -> Path:
    _write_wav(path, np.zeros(round(seconds * rate), dtype="<i2").tobytes(), rate)
    return path


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def normalize_words(text: str) -> list[str]:
    """Lower case, punctuation dropped (apostrophes inside words kept), split on the rest."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / words of the reference: the Levenshtein
    distance over normalized words. An empty reference gives 0 for an empty hypothesis, else 1
    per inserted word."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        return float(len(hyp))
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i]
        for j, hyp_word in enumerate(hyp, start=1):
            current.append(min(previous[j] + 1,  # deletion
                               current[j - 1] + 1,  # insertion
                               previous[j - 1] + (ref_word != hyp_word)))  # substitution
        previous = current
    return previous[-1] / len(ref)


def have_sox() -> bool:
    return shutil.which("sox") is not None


def silent_flac(path: Path, seconds: float, rate: int = SAMPLE_RATE) -> Path:
    """`seconds` of digital silence as a mono FLAC made by sox (`sox -n -r 16000 -c 1 x.flac
    trim 0 SECONDS`): about 200 KiB an hour; its header says how long it is."""
    # (No `-b 16`: sox would dither down to it, and noise does not compress.)
    subprocess.run(["sox", "-n", "-r", str(rate), "-c", "1", str(path), "trim", "0",
                    str(seconds)], check=True, capture_output=True, timeout=600)
    return path


def flac_with_total_samples(source: Path, dest: Path, total: int) -> Path:
    """A copy of a FLAC file whose STREAMINFO header says it holds `total` samples: 0 is
    "unknown" (as a stream written to a pipe), a small number a header that lies."""
    data = bytearray(Path(source).read_bytes())
    if data[:4] != b"fLaC" or data[4] & 0x7F != 0:
        raise ValueError(f"{source}: not a FLAC file starting with its STREAMINFO block")
    # STREAMINFO starts at byte 8; its 36-bit sample count is at bits 108-143 of it.
    data[21] = (data[21] & 0xF0) | ((total >> 32) & 0x0F)
    data[22:26] = (total & 0xFFFFFFFF).to_bytes(4, "big")
    Path(dest).write_bytes(bytes(data))
    return Path(dest)
