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

Known speakers (the gateway's `diarized_json` with `known_speaker_references[]`): with
`speaker_embeddings=true` the answer also holds `"speaker_embeddings": {"SPEAKER_00": [256
floats], ...}`, what each speaker's voice sounds like (the mean of its turns' window embeddings,
L2-normalised: the cosine similarity of two is their dot product), and `POST
/v1/audio/speaker_embedding` (multipart: `file`, optional `max_seconds`) answers one clip's
`{"model": ID, "duration": SECONDS, "embedding": [256 floats]}` (400, code `no_speech`, when
no speech is heard in it; 413 past `max_seconds`). Only engines that embed voices (resemblyzer)
do either; pyannote answers 400 (code `unsupported_parameter`).
Bad input is a 400 in the OpenAI error envelope, never a 500; audio longer than
`--max-audio-seconds` (default 4 hours; the gateway passes settings.max_audio_seconds) is a 413
(code `audio_too_long`), refused before it is decoded (audio_input.py).

Engines (engines.py): `resemblyzer`, the offline CPU default (`--model resemblyzer`, a
resemblyzer `.pt` file, or a folder holding `pretrained.pt`), and `pyannote` (any other
`--model`; needs `pyannote.audio`, else the worker exits at start saying how to install it).

The upload is read as a multipart form by Starlette (the worker apps' skeleton, skeleton.py),
spooled to disk past 1 MiB: a `file` over `--max-upload-mb` is a 413 (code `file_too_large`),
and the body is cut off as soon as it passes that limit (plus room for the other fields), so
an upload never costs more disk than that; other fields are limited to 4 KiB each.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from modelhost.errors import InvalidRequest, RequestTooLarge
from modelhost.workers.apps.audio_input import (
    DEFAULT_MAX_SECONDS,
    AudioTooLong,
    NoAudioStream,
    cap_argument,
    decode_capped,
)
from modelhost.workers.apps.diarization.engines import (
    Engine,
    PyannoteEngine,
    ResemblyzerEngine,
    ResemblyzerOptions,
    VoiceEngine,
    choose_engine,
)
from modelhost.workers.apps.diarization.steps import (
    DEFAULT_MAX_SPEAKERS,
    SAMPLE_RATE,
    FloatArray,
    SpeakerBounds,
    Turn,
    speaker_name,
    to_rttm,
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

FIELD_BYTES = 4096  # the longest non-file field
# What a form may hold besides its file (parts' headers, the other fields): the body is cut
# off once it passes --max-upload-mb plus this.
FORM_ROOM = 1024 * 1024
RESPONSE_FORMATS = ("json", "verbose_json", "rttm")


# ----------------------------------------------------------------------------- audio


def decode_audio(path: str | Path, sample_rate: int = SAMPLE_RATE,
                 max_seconds: float | None = None) -> FloatArray:
    """Any container/codec FFmpeg reads → mono float32 at `sample_rate`; InvalidRequest if not,
    and RequestTooLarge (413, code `audio_too_long`) for audio longer than `max_seconds`, told
    by the header before decoding or as soon as decoding passes it (audio_input.py)."""
    try:
        audio = decode_capped(path, max_seconds, sample_rate, skip_invalid=False)
    except NoAudioStream:
        raise InvalidRequest("the file has no audio stream", param="file",
                             code="invalid_audio") from None
    except AudioTooLong as exc:
        raise RequestTooLarge(exc.message, param="file", code="audio_too_long") from None
    except Exception as exc:  # FFmpeg's errors are many; all of them mean "not audio we read"
        reason = getattr(exc, "strerror", None) or type(exc).__name__  # not the spool's path
        raise InvalidRequest(f"could not decode the audio file ({reason})", param="file",
                             code="invalid_audio") from exc
    if not audio.size:
        raise InvalidRequest("the audio file holds no samples", param="file",
                             code="invalid_audio")
    return audio


# ----------------------------------------------------------------------------- fields


def _int_field(fields: Mapping[str, str], name: str) -> int | None:
    raw = fields.get(name, "").strip()
    if raw == "" or raw.lower() in ("null", "none"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, got '{raw[:40]}'", param=name,
                             code="invalid_value") from None
    if not value.is_integer():
        raise InvalidRequest(f"{name} must be an integer, got '{raw[:40]}'", param=name,
                             code="invalid_value")
    if value < 1:
        raise InvalidRequest(f"{name} must be at least 1, got {int(value)}", param=name,
                             code="invalid_value")
    if value > 1000:
        raise InvalidRequest(f"{name} is too large: {int(value)}", param=name,
                             code="invalid_value")
    return int(value)


def speaker_bounds(fields: Mapping[str, str]) -> SpeakerBounds:
    num = _int_field(fields, "num_speakers")
    low = _int_field(fields, "min_speakers")
    high = _int_field(fields, "max_speakers")
    if low is not None and high is not None and low > high:
        raise InvalidRequest(f"min_speakers ({low}) is greater than max_speakers ({high})",
                             param="min_speakers", code="invalid_value")
    if num is not None and ((low is not None and num < low) or
                            (high is not None and num > high)):
        raise InvalidRequest(f"num_speakers ({num}) is outside [min_speakers, max_speakers]",
                             param="num_speakers", code="invalid_value")
    low = low or 1
    high = high or max(DEFAULT_MAX_SPEAKERS, low)
    return SpeakerBounds(num=num, low=low, high=high)


def _true(fields: Mapping[str, str], name: str) -> bool:
    return fields.get(name, "").strip().lower() in ("true", "1", "yes", "on")


def _max_seconds(fields: Mapping[str, str], cap: float | None) -> float | None:
    raw = fields.get("max_seconds", "").strip()
    if not raw:
        return cap
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0:  # also refuses nan
        raise InvalidRequest(f"max_seconds must be a positive number, got '{raw[:40]}'",
                             param="max_seconds", code="invalid_value")
    return value if cap is None else min(value, cap)


def _voices(engine: Engine) -> VoiceEngine:
    if not hasattr(engine, "voice"):
        raise InvalidRequest(f"the {engine.name} engine does not embed voices: known speakers "
                             "need the resemblyzer engine", param="speaker_embeddings",
                             code="unsupported_parameter")
    return cast(VoiceEngine, engine)


def _vector(vector: FloatArray) -> list[float]:
    return [round(float(x), 5) for x in vector]


def response_format(fields: Mapping[str, str]) -> str:
    fmt = fields.get("response_format", "json").strip() or "json"
    if fmt not in RESPONSE_FORMATS:
        raise InvalidRequest(f"response_format must be json or rttm, not '{fmt[:40]}'",
                             param="response_format", code="invalid_value")
    return fmt


# ----------------------------------------------------------------------------- HTTP


def build_app(engine: Engine, served_name: str, max_upload_bytes: int,
              max_audio_seconds: float | None = DEFAULT_MAX_SECONDS) -> Starlette:
    """The worker's HTTP face over a loaded engine: one request diarizes at a time, in a
    thread."""
    lock = threading.Lock()

    def file_too_large() -> RequestTooLarge:
        return RequestTooLarge(f"the file is larger than {max_upload_bytes} bytes",
                               param="file", code="file_too_large")

    def run(audio: FloatArray, bounds: SpeakerBounds) -> list[Turn]:
        with lock:
            return engine.diarize(audio, bounds)

    def speaker_voices(voices: VoiceEngine, audio: FloatArray, turns: Sequence[Turn]
                       ) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        with lock:
            for speaker in sorted({t.speaker for t in turns}):
                vector = voices.voice(audio, [(t.start, t.end) for t in turns
                                              if t.speaker == speaker])
                if vector is not None:
                    out[speaker_name(speaker)] = _vector(vector)
        return out

    def clip_voice(voices: VoiceEngine, audio: FloatArray) -> FloatArray | None:
        with lock:
            return voices.voice(audio, None)

    @asynccontextmanager
    async def upload(request: Request) -> AsyncIterator[tuple[dict[str, str], Path, str]]:
        """The form's fields (each at most FIELD_BYTES), its `file` spooled to disk (deleted
        on exit) and the file's name."""
        async with read_form(request, max_files=8, max_fields=64,
                             max_field_bytes=16 * FIELD_BYTES,
                             max_body_bytes=max_upload_bytes + FORM_ROOM,
                             too_large=file_too_large()) as form:
            part = _the_file(request, form.getlist("file"))
            if part.size is not None and part.size > max_upload_bytes:
                raise file_too_large()
            if not part.size:
                raise InvalidRequest("the uploaded file is empty", param="file",
                                     code="empty_file")
            fields: dict[str, str] = {}
            for name, value in form.multi_items():
                if isinstance(value, str) and name != "file":
                    if len(value.encode()) > FIELD_BYTES:
                        raise InvalidRequest(f"field {name} is too long", param=name,
                                             code="invalid_value")
                    fields[name] = value
            filename = part.filename or ""
            spool = await asyncio.to_thread(spool_upload, part)
        try:
            yield fields, spool, filename
        finally:
            spool.unlink(missing_ok=True)

    async def diarization(request: Request) -> Response:
        async with upload(request) as (fields, spool, filename):
            bounds = speaker_bounds(fields)
            fmt = response_format(fields)
            voices = _voices(engine) if _true(fields, "speaker_embeddings") else None
            audio = await asyncio.to_thread(decode_audio, spool, SAMPLE_RATE, max_audio_seconds)
        duration = len(audio) / SAMPLE_RATE
        turns = await asyncio.to_thread(run, audio, bounds)
        headers = {"X-Audio-Seconds": f"{duration:.3f}"}
        if fmt == "rttm":
            file_id = Path(filename).stem if filename else "audio"
            return PlainTextResponse(to_rttm(turns, file_id), headers=headers)
        body = {
            "model": served_name, "duration": round(duration, 3),
            "num_speakers": len({t.speaker for t in turns}),
            "segments": [{"speaker": speaker_name(t.speaker), "start": round(t.start, 3),
                          "end": round(t.end, 3)} for t in turns]}
        if voices is not None:
            body["speaker_embeddings"] = await asyncio.to_thread(speaker_voices, voices, audio,
                                                                 turns)
        return JSONResponse(body, headers=headers)

    async def speaker_embedding(request: Request) -> Response:
        async with upload(request) as (fields, spool, _filename):
            voices = _voices(engine)
            cap = _max_seconds(fields, max_audio_seconds)
            audio = await asyncio.to_thread(decode_audio, spool, SAMPLE_RATE, cap)
        duration = len(audio) / SAMPLE_RATE
        vector = await asyncio.to_thread(clip_voice, voices, audio)
        if vector is None:
            raise InvalidRequest("no speech was heard in the audio", param="file",
                                 code="no_speech")
        return JSONResponse({"model": served_name, "duration": round(duration, 3),
                             "embedding": _vector(vector)},
                            headers={"X-Audio-Seconds": f"{duration:.3f}"})

    return build_worker_app(
        name="diarization", served_name=served_name, card={"engine": engine.name},
        routes=[Route("/v1/audio/diarization", diarization, methods=["POST"]),
                Route("/v1/audio/speaker_embedding", speaker_embedding, methods=["POST"])])


def _the_file(request: Request, values: Sequence[UploadFile | str]) -> UploadFile:
    """The one `file` part of the form, or the 400 that says what is wrong."""
    if not values:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise InvalidRequest("expected a multipart/form-data body with a `file` part",
                                 param="file", code="invalid_body")
        raise InvalidRequest("a `file` part is required", param="file", code="missing_file")
    if len(values) > 1:
        raise InvalidRequest("send one `file` part only", param="file", code="invalid_body")
    upload = values[0]
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("`file` must be an uploaded file, not a text field", param="file",
                             code="invalid_body")
    return upload


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = ResemblyzerOptions()
    p = argparse.ArgumentParser(prog="python -m modelhost.workers.apps.diarization",
                                description="modelhost's speaker diarization worker")
    p.add_argument("--model", required=True,
                   help="`resemblyzer`, a resemblyzer .pt file, or a pyannote pipeline")
    add_common_arguments(p, device_default="cpu", device_help="cpu, cuda or cuda:N")
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
    setup_logging(args.log_level)
    served = args.served_name or args.model
    engine = load_or_exit(f"the diarization model {args.model} on {args.device}",
                          lambda: load_engine(args))
    app = build_app(engine, served, int(args.max_upload_mb * 1024 * 1024),
                    args.max_audio_seconds)
    serve(app, args)
