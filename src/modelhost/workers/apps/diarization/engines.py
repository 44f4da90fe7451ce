"""The diarization engines: resemblyzer (the offline CPU default) and pyannote (optional).

* `resemblyzer` (`--model resemblyzer`, a resemblyzer `.pt` file, or a folder holding
  `pretrained.pt`): the voice encoder's weights ship inside the `resemblyzer` package, so it
  needs no token and no network. The pipeline (its pure steps are in steps.py):
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

import importlib
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from modelhost.workers.apps.diarization.steps import (
    SAMPLE_RATE,
    FloatArray,
    SpeakerBounds,
    Turn,
    absorb_short_runs,
    cluster_embeddings,
    finalize_turns,
    majority_filter,
    mask_to_regions,
    smooth_vad,
    trim_regions,
    window_starts,
)

MEL_HOP = 160  # samples per mel frame (10 ms): resemblyzer's `mel_window_step`
VAD_FRAME = 480  # samples per webrtcvad frame (30 ms)
# A voice is the mean of at most this many window embeddings (spread evenly over its speech):
# an hour-long speaker costs what a few minutes do, and the mean hardly moves past it.
MAX_VOICE_WINDOWS = 240

PYANNOTE_MISSING = ("pyannote.audio is not installed: pip install pyannote.audio; it also needs "
                    "a Hugging Face token and the model's terms accepted")


class Engine(Protocol):
    name: str

    def diarize(self, audio: FloatArray, bounds: SpeakerBounds) -> list[Turn]: ...


class VoiceEngine(Engine, Protocol):
    """An engine that can also say what a voice sounds like (known speakers: the gateway
    compares a reference clip's voice with each diarized speaker's)."""

    def voice(self, audio: FloatArray, spans: Sequence[tuple[float, float]] | None
              ) -> FloatArray | None: ...


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

    def _louder(self, audio: FloatArray) -> FloatArray:
        return np.asarray(self._normalize(audio, self._target_dbfs, increase_only=True),
                          dtype=np.float32) if np.any(audio) else audio

    def voice(self, audio: FloatArray, spans: Sequence[tuple[float, float]] | None
              ) -> FloatArray | None:
        """What the speech in `spans` (seconds; None: wherever voice activity is heard) sounds
        like: the mean of the L2-normalised embeddings of its windows (`--window` long, every
        `--step`, at most MAX_VOICE_WINDOWS), normalised; None when there is no speech (no
        span of `--min-turn` or more)."""
        opts = self.options
        audio = self._louder(audio)
        if spans is None:
            regions = self.speech_regions(audio)
        else:
            regions = [(round(a * SAMPLE_RATE), round(b * SAMPLE_RATE)) for a, b in spans]
        min_frames = max(1, round(opts.min_turn * SAMPLE_RATE / MEL_HOP))
        frames = [(a // MEL_HOP, b // MEL_HOP) for a, b in regions]
        frames = [(a, b) for a, b in frames if b - a >= min_frames]
        if not frames:
            return None
        mel = self._mel(audio)
        window = max(1, round(opts.window * SAMPLE_RATE / MEL_HOP))
        step = max(1, round(opts.step * SAMPLE_RATE / MEL_HOP))
        windows = [(a + s, min(a + s + window, b, len(mel)))
                   for a, b in frames if a < len(mel)
                   for s in window_starts(min(b, len(mel)) - a, window, step)]
        windows = [(a, b) for a, b in windows if b > a]
        if not windows:
            return None
        if len(windows) > MAX_VOICE_WINDOWS:
            pick = np.linspace(0, len(windows) - 1, MAX_VOICE_WINDOWS).round().astype(int)
            windows = [windows[i] for i in pick]
        embeddings = self.embed(mel, windows)
        embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        mean = embeddings.mean(axis=0)
        return np.asarray(mean / max(float(np.linalg.norm(mean)), 1e-12), dtype=np.float32)

    def diarize(self, audio: FloatArray, bounds: SpeakerBounds) -> list[Turn]:
        opts = self.options
        audio = self._louder(audio)
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
