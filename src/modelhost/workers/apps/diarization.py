"""Speaker diarization worker: who spoke when, in the OpenAI style of modelhost's worker apps.

    python -m modelhost.workers.apps.diarization --model resemblyzer|WEIGHTS.pt|PIPELINE
        --host H --port P --served-name ID [--device cpu|cuda] [--engine auto|resemblyzer|pyannote]
        [--window 1.5] [--step 0.25] [--threshold 0.35] [--smoothing 5] [--min-turn 0.3]
        [--merge-gap 0.5] [--vad-mode 3] [--max-windows 3000] [--max-upload-mb 1024]
        [--max-audio-seconds 14400]

Routes: `GET /v1/models` (200 once the model is loaded: the port opens only then),
`GET /health`, and `POST /v1/audio/diarization` (multipart: `file`, `model`, `num_speakers`,
`min_speakers`, `max_speakers`, `response_format` = `json` (or `verbose_json`, the same) |
`rttm` (NIST RTTM text, the file id from the upload's name)), which answers in JSON

    {"model": ID, "duration": SECONDS, "num_speakers": N,
     "segments": [{"speaker": "SPEAKER_00", "start": 0.0, "end": 1.2}, ...]}

with the header `X-Audio-Seconds`. Speakers are numbered in order of first appearance.
Bad input is a 400 in the OpenAI error envelope, never a 500; audio longer than
`--max-audio-seconds` (default 4 hours; the gateway passes settings.max_audio_seconds) is a 413
(code `audio_too_long`), refused before it is decoded (audio_input.py).

Engines:

* `resemblyzer` (the offline CPU default; `--model resemblyzer`, a resemblyzer `.pt` file, or a
  folder holding `pretrained.pt`): the voice encoder's weights ship inside the `resemblyzer`
  package, so it needs no token and no network. The pipeline:
  1. decode the upload with PyAV to 16 kHz mono float32; raise quiet recordings to -30 dBFS
     (the encoder's training level);
  2. voice activity: webrtcvad (`--vad-mode`) on 30 ms frames, smoothed and dilated as
     resemblyzer does (pauses under ~0.2 s are bridged), but kept as a time mask; each
     region's edges are trimmed back to its first and last voiced frame; regions shorter than
     `--min-turn` are dropped;
  3. embeddings: sliding windows of `--window` seconds every `--step` seconds inside each speech
     region (a region shorter than a window is one window); the step grows on long recordings
     so that at most `--max-windows` windows are clustered;
  4. clustering: average-linkage agglomerative clustering on cosine distance of the
     (L2-normalised) window embeddings. With `num_speakers`, the tree is cut into that many
     clusters. Without it, the tree is cut at cosine distance `--threshold`; clusters holding
     fewer than max(2, 5 %) of the windows are not counted as speakers (they are stray windows,
     reassigned below); the count is clamped to [min_speakers, max_speakers] (default 1..8) and
     the tree is cut into that many clusters. A few centroid reassignment passes then move each
     window to its nearest cluster centroid;
  5. smoothing: a majority filter over `--smoothing` consecutive windows; every 10 ms of speech
     takes the label of the window whose centre is nearest; inside a region, a run shorter
     than `--min-turn` joins its longer neighbour;
  6. turns: runs of one speaker; consecutive turns of the same speaker less than
     `--merge-gap` seconds apart are merged; turns shorter than `--min-turn` are dropped.
* `pyannote` (any other `--model`: a local pipeline folder or a Hugging Face repo id in the
  cache; token from `HF_TOKEN`): needs `pyannote.audio`, which is not a dependency of modelhost;
  without it the worker exits at start and says how to install it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from aiohttp import BodyPartReader, web

from modelhost.workers.apps.audio_input import (
    DEFAULT_MAX_SECONDS,
    AudioTooLong,
    NoAudioStream,
    cap_argument,
    decode_capped,
)

SAMPLE_RATE = 16000
MEL_HOP = 160  # samples per mel frame (10 ms): resemblyzer's `mel_window_step`
VAD_FRAME = 480  # samples per webrtcvad frame (30 ms)
DEFAULT_MAX_SPEAKERS = 8

PYANNOTE_MISSING = ("pyannote.audio is not installed: pip install pyannote.audio; it also needs "
                    "a Hugging Face token and the model's terms accepted")

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


class RequestError(Exception):
    """Bad input: answered with the OpenAI error envelope (400 unless told)."""

    def __init__(self, message: str, param: str | None, code: str | None = None,
                 status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


@dataclass(frozen=True)
class SpeakerBounds:
    """How many speakers to find: exactly `num`, or between `low` and `high`."""

    num: int | None = None
    low: int = 1
    high: int = DEFAULT_MAX_SPEAKERS


@dataclass(frozen=True)
class Turn:
    speaker: int
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


class Engine(Protocol):
    name: str

    def diarize(self, audio: FloatArray, bounds: SpeakerBounds) -> list[Turn]: ...


# ----------------------------------------------------------------------------- audio


def decode_audio(path: str | Path, sample_rate: int = SAMPLE_RATE,
                 max_seconds: float | None = None) -> FloatArray:
    """Any container/codec FFmpeg reads → mono float32 at `sample_rate`; RequestError if not,
    and a 413 RequestError (code `audio_too_long`) for audio longer than `max_seconds`, told
    by the header before decoding or as soon as decoding passes it (audio_input.py)."""
    try:
        audio = decode_capped(path, max_seconds, sample_rate, skip_invalid=False)
    except NoAudioStream:
        raise RequestError("the file has no audio stream", "file", "invalid_audio") from None
    except AudioTooLong as exc:
        raise RequestError(exc.message, "file", "audio_too_long", 413) from None
    except Exception as exc:  # FFmpeg's errors are many; all of them mean "not audio we read"
        reason = getattr(exc, "strerror", None) or type(exc).__name__  # not the spool's path
        raise RequestError(f"could not decode the audio file ({reason})", "file",
                           "invalid_audio") from exc
    if not audio.size:
        raise RequestError("the audio file holds no samples", "file", "invalid_audio")
    return audio


# ----------------------------------------------------------------------------- pure steps


def mask_to_regions(mask: BoolArray, frame: int) -> list[tuple[int, int]]:
    """Runs of True in a per-frame mask → (start, end) sample indices."""
    padded = np.concatenate(([False], mask.astype(bool), [False]))
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a) * frame, int(b) * frame) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def smooth_vad(flags: BoolArray, average: int = 8, dilation: int = 7) -> BoolArray:
    """resemblyzer's VAD smoothing (moving average, round, binary dilation), kept as a mask."""
    if not len(flags):
        return flags.astype(bool)
    x = flags.astype(np.float64)
    padded = np.concatenate((np.zeros((average - 1) // 2), x, np.zeros(average // 2)))
    csum = np.cumsum(padded)
    csum[average:] = csum[average:] - csum[:-average]
    mask = np.round(csum[average - 1:] / average).astype(bool)
    half = dilation // 2
    out = np.zeros_like(mask)
    for shift in range(-half, dilation - half):
        if shift >= 0:
            out[shift:] |= mask[:len(mask) - shift]
        else:
            out[:shift] |= mask[-shift:]
    return out


def trim_regions(regions: list[tuple[int, int]], flags: BoolArray,
                 frame: int) -> list[tuple[int, int]]:
    """(start, end) frame regions → sample regions trimmed to their first and last True flag
    (regions with no True flag are dropped)."""
    out: list[tuple[int, int]] = []
    for a, b in regions:
        voiced = np.flatnonzero(flags[a:b])
        if len(voiced):
            out.append(((a + int(voiced[0])) * frame, (a + int(voiced[-1]) + 1) * frame))
    return out


def window_starts(length: int, window: int, step: int) -> list[int]:
    """Window starts covering [0, length): every `step`, the last one flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, step))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _hierarchy() -> Any:
    # scipy ships no type information: this module's narrow wrappers below are typed.
    return importlib.import_module("scipy.cluster.hierarchy")


def _cut(tree: Any, value: float, criterion: str) -> IntArray:
    labels = _hierarchy().fcluster(tree, t=value, criterion=criterion)
    return np.asarray(labels, dtype=np.int64) - 1


def _compact(labels: IntArray) -> IntArray:
    _, inverse = np.unique(labels, return_inverse=True)
    return np.asarray(inverse, dtype=np.int64).reshape(-1)


def cluster_embeddings(embeddings: FloatArray, bounds: SpeakerBounds,
                       threshold: float, refine: int = 5) -> IntArray:
    """One speaker label per embedding (0..k-1); see the module docstring for the rule."""
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    x = embeddings.astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    tree = _hierarchy().linkage(x, method="average", metric="cosine")
    if bounds.num is not None:
        k = bounds.num
    else:
        cut = _cut(tree, threshold, "distance")
        sizes = np.bincount(cut)
        significant = int(np.sum(sizes >= max(2, math.ceil(0.05 * n))))
        k = min(max(significant, 1, bounds.low), bounds.high)
    k = max(1, min(k, n))
    labels = _compact(_cut(tree, k, "maxclust"))
    for _ in range(refine):
        count = int(labels.max()) + 1
        centroids = np.stack([x[labels == c].mean(axis=0) for c in range(count)])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        moved = np.asarray(np.argmax(x @ centroids.T, axis=1), dtype=np.int64)
        if len(np.unique(moved)) < count or np.array_equal(moved, labels):
            break  # never let a pass empty a cluster
        labels = moved
    return labels


def majority_filter(labels: IntArray, width: int) -> IntArray:
    """Each label becomes the most common one among its `width` neighbours (ties keep it)."""
    if width <= 1 or len(labels) < 3:
        return labels.copy()
    half = width // 2
    out = labels.copy()
    for i in range(len(labels)):
        votes = np.bincount(labels[max(0, i - half):i + half + 1])
        best = int(np.argmax(votes))
        if votes[best] > votes[labels[i]]:
            out[i] = best
    return out


def absorb_short_runs(runs: list[list[int]], min_length: int) -> list[list[int]]:
    """`runs` = [[label, start, end], ...] of one region, end-to-end. A run shorter than
    `min_length` takes the label of its longer neighbour; equal neighbours' runs then merge."""
    runs = [list(r) for r in runs]
    while len(runs) > 1:
        lengths = [r[2] - r[1] for r in runs]
        i = int(np.argmin(lengths))
        if lengths[i] >= min_length:
            break
        left = runs[i - 1] if i > 0 else None
        right = runs[i + 1] if i + 1 < len(runs) else None
        if left is None or (right is not None and right[2] - right[1] > left[2] - left[1]):
            assert right is not None
            right[1] = runs[i][1]
        else:
            left[2] = runs[i][2]
        del runs[i]
        merged: list[list[int]] = []
        for r in runs:
            if merged and merged[-1][0] == r[0]:
                merged[-1][2] = r[2]
            else:
                merged.append(r)
        runs = merged
    return runs


def finalize_turns(turns: Sequence[Turn], merge_gap: float, min_turn: float) -> list[Turn]:
    """Merge same-speaker neighbours closer than `merge_gap`, drop turns under `min_turn`,
    renumber speakers by first appearance (0, 1, ...)."""
    merged: list[Turn] = []
    for turn in sorted(turns, key=lambda t: t.start):
        if merged and merged[-1].speaker == turn.speaker and \
                turn.start - merged[-1].end <= merge_gap:
            merged[-1] = Turn(turn.speaker, merged[-1].start, max(merged[-1].end, turn.end))
        else:
            merged.append(turn)
    kept = [t for t in merged if t.duration >= min_turn]
    # Dropping a short turn may leave two turns of one speaker side by side: merge again.
    final: list[Turn] = []
    for turn in kept:
        if final and final[-1].speaker == turn.speaker and \
                turn.start - final[-1].end <= merge_gap:
            final[-1] = Turn(turn.speaker, final[-1].start, turn.end)
        else:
            final.append(turn)
    order: dict[int, int] = {}
    for turn in final:
        order.setdefault(turn.speaker, len(order))
    return [Turn(order[t.speaker], t.start, t.end) for t in final]


def speaker_name(index: int) -> str:
    return f"SPEAKER_{index:02d}"


def to_rttm(turns: Sequence[Turn], file_id: str) -> str:
    """NIST RTTM: one `SPEAKER file 1 start duration <NA> <NA> name <NA> <NA>` line a turn."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in file_id) or "audio"
    return "".join(f"SPEAKER {safe} 1 {t.start:.3f} {t.duration:.3f} <NA> <NA> "
                   f"{speaker_name(t.speaker)} <NA> <NA>\n" for t in turns)


# ----------------------------------------------------------------------------- resemblyzer


class _Encoder(Protocol):
    """The part of resemblyzer.VoiceEncoder used here (an nn.Module: batch of mels → embeds)."""

    def __call__(self, mels: Any) -> Any: ...


@dataclass(frozen=True)
class ResemblyzerOptions:
    window: float = 1.5
    step: float = 0.25
    threshold: float = 0.35
    smoothing: int = 5
    min_turn: float = 0.3
    merge_gap: float = 0.5
    vad_mode: int = 3
    max_windows: int = 3000
    batch: int = 64


def _import_quietly(name: str) -> Any:
    """Import resemblyzer / webrtcvad, silencing only their known import-time warnings:
    `scipy.ndimage.morphology` (DeprecationWarning), webrtcvad's `pkg_resources` (UserWarning).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated",
                                category=UserWarning)
        return importlib.import_module(name)


class ResemblyzerEngine:
    name = "resemblyzer"

    def __init__(self, weights: Path | None, device: str,
                 options: ResemblyzerOptions | None = None) -> None:
        import torch

        self._torch = torch
        self.options = options or ResemblyzerOptions()
        resemblyzer = _import_quietly("resemblyzer")
        audio = _import_quietly("resemblyzer.audio")
        self._vad_class: Callable[[int], Any] = _import_quietly("webrtcvad").Vad
        self._mel: Callable[[FloatArray], FloatArray] = audio.wav_to_mel_spectrogram
        self._normalize: Callable[..., FloatArray] = audio.normalize_volume
        self._target_dbfs = float(_import_quietly("resemblyzer.hparams").audio_norm_target_dBFS)
        encoder: _Encoder = resemblyzer.VoiceEncoder(device, verbose=False,
                                                     weights_fpath=weights)
        self._encoder = encoder
        self._device = torch.device(device)
        # The first mel spectrogram compiles librosa's kernels (seconds): do it before the
        # worker reports ready, not on the first request.
        warm = self._mel(np.zeros(SAMPLE_RATE, dtype=np.float32))
        self.embed(warm, [(0, len(warm))])

    # -- steps -------------------------------------------------------------------------

    def speech_regions(self, audio: FloatArray) -> list[tuple[int, int]]:
        """Speech as (start, end) sample indices: webrtcvad flags on 30 ms frames, smoothed as
        resemblyzer's `trim_long_silences` does, each region's edges then trimmed back to its
        first and last voiced frame (the dilation bridges short pauses, not turn edges)."""
        vad = self._vad_class(self.options.vad_mode)
        usable = len(audio) - len(audio) % VAD_FRAME
        pcm = (np.clip(audio[:usable], -1.0, 1.0) * 32767).astype("<i2").tobytes()
        step = VAD_FRAME * 2
        flags = np.array([bool(vad.is_speech(pcm[i:i + step], SAMPLE_RATE))
                          for i in range(0, len(pcm), step)], dtype=bool)
        return trim_regions(mask_to_regions(smooth_vad(flags), 1), flags, VAD_FRAME)

    def embed(self, mel: FloatArray, windows: list[tuple[int, int]]) -> FloatArray:
        """One embedding per (start, end) window of mel frames; equal lengths go in batches."""
        torch = self._torch
        out = np.zeros((len(windows), 256), dtype=np.float32)
        by_length: dict[int, list[int]] = {}
        for i, (a, b) in enumerate(windows):
            by_length.setdefault(b - a, []).append(i)
        with torch.inference_mode():
            for indices in by_length.values():
                for k in range(0, len(indices), self.options.batch):
                    chunk = indices[k:k + self.options.batch]
                    batch = np.stack([mel[windows[i][0]:windows[i][1]] for i in chunk])
                    embeds = self._encoder(torch.from_numpy(batch).to(self._device))
                    out[chunk] = embeds.detach().cpu().numpy()
        return out

    def diarize(self, audio: FloatArray, bounds: SpeakerBounds) -> list[Turn]:
        opts = self.options
        audio = np.asarray(self._normalize(audio, self._target_dbfs, increase_only=True),
                           dtype=np.float32) if np.any(audio) else audio
        min_frames = round(opts.min_turn * SAMPLE_RATE / MEL_HOP)
        regions = [(a // MEL_HOP, b // MEL_HOP) for a, b in self.speech_regions(audio)]
        regions = [(a, b) for a, b in regions if b - a >= min_frames]
        if not regions:
            return []
        mel = self._mel(audio)
        regions = [(a, min(b, len(mel))) for a, b in regions if a < len(mel)]
        window = max(1, round(opts.window * SAMPLE_RATE / MEL_HOP))
        step = max(1, round(opts.step * SAMPLE_RATE / MEL_HOP))
        speech = sum(b - a for a, b in regions)
        step = max(step, math.ceil(speech / max(1, opts.max_windows)))
        windows: list[tuple[int, int]] = []
        owners: list[int] = []
        for r, (a, b) in enumerate(regions):
            for s in window_starts(b - a, window, step):
                windows.append((a + s, min(a + s + window, b)))
                owners.append(r)
        embeddings = self.embed(mel, windows)
        labels = cluster_embeddings(embeddings, bounds, opts.threshold)
        labels = majority_filter(labels, opts.smoothing)
        owner = np.asarray(owners)
        centers = np.array([(a + b) / 2 for a, b in windows])
        turns: list[Turn] = []
        for r, (a, b) in enumerate(regions):
            idx = np.flatnonzero(owner == r)
            c = centers[idx]
            frames = np.arange(a, b) + 0.5
            nearest = np.searchsorted((c[:-1] + c[1:]) / 2, frames)
            frame_labels = labels[idx][nearest]
            change = np.flatnonzero(np.diff(frame_labels)) + 1
            starts = np.concatenate(([0], change))
            ends = np.concatenate((change, [len(frame_labels)]))
            runs = [[int(frame_labels[s]), a + int(s), a + int(e)]
                    for s, e in zip(starts, ends, strict=True)]
            for label, s, e in absorb_short_runs(runs, min_frames):
                turns.append(Turn(label, s * MEL_HOP / SAMPLE_RATE, e * MEL_HOP / SAMPLE_RATE))
        return finalize_turns(turns, opts.merge_gap, opts.min_turn)


# ----------------------------------------------------------------------------- pyannote


class PyannoteEngine:
    name = "pyannote"

    def __init__(self, model: str, device: str) -> None:
        try:
            audio_pkg = importlib.import_module("pyannote.audio")
        except ImportError as exc:
            raise SystemExit(PYANNOTE_MISSING) from exc
        import torch

        self._torch = torch
        token = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGINGFACE_TOKEN")
                 or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
        pipeline_class = audio_pkg.Pipeline
        try:
            try:  # pyannote.audio 4 says `token`, 3.x `use_auth_token`
                pipeline = pipeline_class.from_pretrained(model, token=token)
            except TypeError:
                pipeline = pipeline_class.from_pretrained(model, use_auth_token=token)
        except Exception as exc:
            raise SystemExit(f"could not load the pyannote pipeline '{model}': {exc} (a hub "
                             "pipeline must be in the Hugging Face cache, downloaded with a "
                             "token whose account accepted the model's terms)") from exc
        if pipeline is None:  # 3.x returns None (and logs why) when the repo is gated
            raise SystemExit(f"could not load the pyannote pipeline '{model}': it needs a "
                             "Hugging Face token (HF_TOKEN) and the model's terms accepted, "
                             "or a local copy of the pipeline")
        pipeline.to(torch.device(device))
        self._pipeline = pipeline

    def diarize(self, audio: FloatArray, bounds: SpeakerBounds) -> list[Turn]:
        kwargs: dict[str, int] = {}
        if bounds.num is not None:
            kwargs["num_speakers"] = bounds.num
        else:
            kwargs["min_speakers"] = bounds.low
            kwargs["max_speakers"] = bounds.high
        waveform = self._torch.from_numpy(np.ascontiguousarray(audio))[None]
        output = self._pipeline({"waveform": waveform, "sample_rate": SAMPLE_RATE}, **kwargs)
        annotation = getattr(output, "speaker_diarization", output)  # 4.x wraps the Annotation
        names: dict[str, int] = {}
        turns: list[Turn] = []
        for segment, _track, label in annotation.itertracks(yield_label=True):
            index = names.setdefault(str(label), len(names))
            turns.append(Turn(index, float(segment.start), float(segment.end)))
        return finalize_turns(turns, merge_gap=0.0, min_turn=0.0)


def choose_engine(model: str, engine: str) -> tuple[str, Path | None]:
    """(`resemblyzer` | `pyannote`, resemblyzer weights or None for the packaged ones)."""
    path = Path(model)
    if engine == "auto":
        packaged = model.lower() == "resemblyzer"
        weights_file = path.suffix == ".pt" and path.is_file()
        weights_dir = path.is_dir() and (path / "pretrained.pt").is_file() \
            and not (path / "config.yaml").exists()
        engine = "resemblyzer" if packaged or weights_file or weights_dir else "pyannote"
    if engine == "pyannote":
        return engine, None
    if model.lower() == "resemblyzer":
        return engine, None
    if path.is_dir():
        path = path / "pretrained.pt"
    if not path.is_file():
        raise SystemExit(f"resemblyzer weights not found: {path}")
    return engine, path


# ----------------------------------------------------------------------------- HTTP


def error_response(message: str, param: str | None, code: str | None = None,
                   status: int = 400, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param,
                                        "code": code}}, status=status)


def _int_field(fields: dict[str, str], name: str) -> int | None:
    raw = fields.get(name, "").strip()
    if raw == "" or raw.lower() in ("null", "none"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise RequestError(f"{name} must be an integer, got '{raw[:40]}'", name,
                           "invalid_value") from None
    if not value.is_integer():
        raise RequestError(f"{name} must be an integer, got '{raw[:40]}'", name, "invalid_value")
    if value < 1:
        raise RequestError(f"{name} must be at least 1, got {int(value)}", name, "invalid_value")
    if value > 1000:
        raise RequestError(f"{name} is too large: {int(value)}", name, "invalid_value")
    return int(value)


def speaker_bounds(fields: dict[str, str]) -> SpeakerBounds:
    num = _int_field(fields, "num_speakers")
    low = _int_field(fields, "min_speakers")
    high = _int_field(fields, "max_speakers")
    if low is not None and high is not None and low > high:
        raise RequestError(f"min_speakers ({low}) is greater than max_speakers ({high})",
                           "min_speakers", "invalid_value")
    if num is not None and ((low is not None and num < low) or
                            (high is not None and num > high)):
        raise RequestError(f"num_speakers ({num}) is outside [min_speakers, max_speakers]",
                           "num_speakers", "invalid_value")
    low = low or 1
    high = high or max(DEFAULT_MAX_SPEAKERS, low)
    return SpeakerBounds(num=num, low=low, high=high)


class Worker:
    """The HTTP side: one engine, one lock (a request diarizes at a time, in a thread)."""

    def __init__(self, engine: Engine, served_name: str, max_upload_bytes: int,
                 max_audio_seconds: float | None = DEFAULT_MAX_SECONDS) -> None:
        self.engine = engine
        self.served_name = served_name
        self.max_upload_bytes = max_upload_bytes
        self.max_audio_seconds = max_audio_seconds
        self.created = int(time.time())
        self._lock = threading.Lock()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/audio/diarization", self.diarization)
        return app

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except RequestError as exc:
            return error_response(exc.message, exc.param, exc.code, exc.status)
        except web.HTTPException as exc:
            return error_response(exc.reason, None, None, exc.status)
        except Exception as exc:  # a bug of ours, still in the envelope
            print(f"diarization worker: internal error: {exc!r}", file=sys.stderr, flush=True)
            return error_response(f"internal error: {exc}", None, None, 500, "server_error")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.served_name, "object": "model", "created": self.created,
             "owned_by": "modelhost", "engine": self.engine.name}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _read_form(self, request: web.Request, spool: str) -> tuple[dict[str, str],
                                                                           str | None, int]:
        """Stream the multipart body: the `file` part into `spool`, other parts as text."""
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError, KeyError) as exc:
            raise RequestError("expected a multipart/form-data body with a `file` part",
                               "file", "invalid_body") from exc
        fields: dict[str, str] = {}
        filename: str | None = None
        size = 0
        seen_file = False
        out = await asyncio.to_thread(open, spool, "wb")
        try:
            while True:
                try:
                    part = await reader.next()
                except ValueError as exc:
                    raise RequestError(f"malformed multipart body: {exc}", None,
                                       "invalid_body") from exc
                if part is None:
                    break
                if not isinstance(part, BodyPartReader):
                    raise RequestError("nested multipart bodies are not supported", None,
                                       "invalid_body")
                if part.name == "file":
                    if seen_file:
                        raise RequestError("send one `file` part only", "file", "invalid_body")
                    seen_file = True
                    filename = part.filename
                    while chunk := await part.read_chunk(1 << 16):
                        size += len(chunk)
                        if size > self.max_upload_bytes:
                            raise RequestError(
                                f"the file is larger than {self.max_upload_bytes} bytes",
                                "file", "file_too_large", 413)
                        await asyncio.to_thread(out.write, chunk)
                elif part.name:
                    raw = bytearray()
                    while chunk := await part.read_chunk(4096):
                        raw += chunk
                        if len(raw) > 4096:
                            raise RequestError(f"field {part.name} is too long", part.name,
                                               "invalid_value")
                    fields[part.name] = bytes(raw).decode("utf-8", errors="replace")
        finally:
            await asyncio.to_thread(out.close)
        if not seen_file:
            raise RequestError("a `file` part is required", "file", "missing_file")
        if size == 0:
            raise RequestError("the uploaded file is empty", "file", "empty_file")
        return fields, filename, size

    async def diarization(self, request: web.Request) -> web.Response:
        fd, spool = tempfile.mkstemp(prefix="modelhost-diarization-")
        os.close(fd)
        try:
            fields, filename, _size = await self._read_form(request, spool)
            bounds = speaker_bounds(fields)
            response_format = fields.get("response_format", "json").strip() or "json"
            if response_format not in ("json", "verbose_json", "rttm"):
                raise RequestError(f"response_format must be json or rttm, not "
                                   f"'{response_format[:40]}'", "response_format",
                                   "invalid_value")
            audio = await asyncio.to_thread(decode_audio, spool, SAMPLE_RATE,
                                            self.max_audio_seconds)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(spool)
        duration = len(audio) / SAMPLE_RATE
        turns = await asyncio.to_thread(self._diarize, audio, bounds)
        headers = {"X-Audio-Seconds": f"{duration:.3f}"}
        if response_format == "rttm":
            file_id = Path(filename).stem if filename else "audio"
            return web.Response(text=to_rttm(turns, file_id), content_type="text/plain",
                                headers=headers)
        return web.json_response({
            "model": self.served_name, "duration": round(duration, 3),
            "num_speakers": len({t.speaker for t in turns}),
            "segments": [{"speaker": speaker_name(t.speaker), "start": round(t.start, 3),
                          "end": round(t.end, 3)} for t in turns]}, headers=headers)

    def _diarize(self, audio: FloatArray, bounds: SpeakerBounds) -> list[Turn]:
        with self._lock:
            return self.engine.diarize(audio, bounds)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = ResemblyzerOptions()
    p = argparse.ArgumentParser(prog="python -m modelhost.workers.apps.diarization",
                                description="modelhost's speaker diarization worker")
    p.add_argument("--model", required=True,
                   help="`resemblyzer`, a resemblyzer .pt file, or a pyannote pipeline")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--served-name", default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--engine", choices=["auto", "resemblyzer", "pyannote"], default="auto")
    p.add_argument("--window", type=float, default=defaults.window,
                   help="embedding window, seconds")
    p.add_argument("--step", type=float, default=defaults.step,
                   help="window step, seconds")
    p.add_argument("--threshold", type=float, default=defaults.threshold,
                   help="cosine distance cutting the speaker tree when num_speakers is unset")
    p.add_argument("--smoothing", type=int, default=defaults.smoothing,
                   help="majority filter width, windows")
    p.add_argument("--min-turn", type=float, default=defaults.min_turn)
    p.add_argument("--merge-gap", type=float, default=defaults.merge_gap)
    p.add_argument("--vad-mode", type=int, choices=[0, 1, 2, 3], default=defaults.vad_mode)
    p.add_argument("--max-windows", type=int, default=defaults.max_windows)
    p.add_argument("--max-upload-mb", type=float, default=1024)
    p.add_argument("--max-audio-seconds", type=cap_argument, default=DEFAULT_MAX_SECONDS,
                   help="longer audio is refused (413) before it is decoded (default: 4 hours; "
                        "0 or none: no cap)")
    return p.parse_args(argv)


def load_engine(args: argparse.Namespace) -> Engine:
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available to this process")
    engine, weights = choose_engine(args.model, args.engine)
    if engine == "pyannote":
        return PyannoteEngine(args.model, args.device)
    options = ResemblyzerOptions(window=args.window, step=args.step, threshold=args.threshold,
                                 smoothing=args.smoothing, min_turn=args.min_turn,
                                 merge_gap=args.merge_gap, vad_mode=args.vad_mode,
                                 max_windows=args.max_windows)
    return ResemblyzerEngine(weights, args.device, options)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    served = args.served_name or args.model
    print(f"diarization worker: loading {args.model} on {args.device}", flush=True)
    started = time.monotonic()
    engine = load_engine(args)
    print(f"diarization worker: {engine.name} ready in {time.monotonic() - started:.1f} s, "
          f"serving '{served}' on {args.host}:{args.port}", flush=True)
    worker = Worker(engine, served, int(args.max_upload_mb * 1024 * 1024),
                    args.max_audio_seconds)
    web.run_app(worker.app(), host=args.host, port=args.port, print=None,
                handle_signals=True)


if __name__ == "__main__":
    main()
