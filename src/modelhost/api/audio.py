"""The OpenAI audio routes: transcriptions and translations, relayed to speech workers.

Uploads are bounded (uploads.py: body size, parts, header bytes per part; 413 past any) and
parsed off the event loop; the audio's duration is bounded by the workers themselves
(`--max-audio-seconds`, settings.max_audio_seconds), whose 413 the relay passes on.

Two transcripts with speakers are composed here from a speech worker's verbose_json (with
words) and a diarization worker's turns (diarize.py aligns them): OpenAI's own
`response_format=diarized_json` (diarized_json.py: its shape, known speakers matched by
voice, server-sent events with `stream=true`), and the older extension `diarize=true`
(verbose_json whose segments and words carry `speaker`)."""

from __future__ import annotations

import asyncio
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from python_multipart.multipart import parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from modelhost.api.uploads import Upload, extract_file_async, new_parser, spool_multipart
from modelhost.catalog import DEFAULT_DIARIZATION_MODEL
from modelhost.config import ModelSpec, Task
from modelhost.diarize import assign_speakers
from modelhost.diarized_json import (
    REFERENCE_MAX_SECONDS,
    REFERENCE_MIN_SECONDS,
    REFERENCES,
    chunking_strategy,
    decode_data_url,
    diarized_json,
    known_speaker_names,
    known_speaker_threshold,
    match_speakers,
    reference_count,
    stream_events,
)
from modelhost.errors import InvalidRequest, ModelhostError
from modelhost.logs import request_id as bound_request_id
from modelhost.registry.registry import Registry
from modelhost.requestid import from_headers
from modelhost.serving.call import Relay
from modelhost.serving.endpoint import RelayEndpoint
from modelhost.upstream import Multipart

RESPONSE_FORMATS = {"json", "text", "srt", "vtt", "verbose_json"}
DIARIZED_JSON = "diarized_json"  # transcriptions only, as at OpenAI


class AudioRoutes:
    def __init__(self, registry: Registry, relay: Relay, max_upload_bytes: int,
                 spool_dir: Path | None = None, max_parts: int = 64,
                 max_part_header_bytes: int = 16 * 1024) -> None:
        self.registry = registry
        self.relay = relay
        self.max_upload_bytes = max_upload_bytes
        self.max_parts = max_parts
        self.max_part_header_bytes = max_part_header_bytes
        self.spool_dir = spool_dir

    def routes(self) -> list[Route]:
        return [
            Route("/v1/audio/transcriptions", self.transcriptions, methods=["POST"]),
            Route("/v1/audio/translations", self.translations, methods=["POST"]),
            Route("/v1/audio/diarization", self.diarization, methods=["POST"]),
        ]

    async def transcriptions(self, request: Request) -> ASGIApp:
        return await self._relay(request, "/audio/transcriptions", Task.transcription)

    async def translations(self, request: Request) -> ASGIApp:
        return await self._relay(request, "/audio/translations", Task.transcription)

    async def diarization(self, request: Request) -> ASGIApp:
        return await self._relay(request, "/audio/diarization", Task.diarization)

    async def _relay(self, request: Request, path: str, task: Task) -> ASGIApp:
        rid = from_headers(request.scope["headers"])
        bound_request_id.set(rid)  # the request's task: its log lines
        upload = await spool_multipart(request, self.max_upload_bytes, self.spool_dir,
                                       self.max_parts, self.max_part_header_bytes)
        try:
            spec = self._check(upload, task, path)
            authorization = next((v for k, v in request.scope["headers"]
                                  if k == b"authorization"), None)
            if upload.get("response_format") == DIARIZED_JSON:
                return await self._diarized_json(upload, spec, authorization)
            if task is Task.transcription and _true(upload.get("diarize")):
                return await self._diarized(upload, spec, path, authorization)
            # The body goes to the worker exactly as it came; its `model` field may be an
            # alias, which our worker apps ignore (each serves one model).
            call = self.relay.call(self.registry.models[spec.id], path, upload.body,
                                   {"Content-Type": upload.content_type}, rid,
                                   authorization)
            # Answered, errors included, and counted as the relayed JSON routes are.
            return await RelayEndpoint.settle(call.answer, request.scope, call)
        finally:
            upload.close()

    async def _diarized(self, upload: Upload, speech: ModelSpec, path: str,
                        authorization: bytes | None) -> ASGIApp:
        """A transcript whose segments and words carry speakers: the speech worker's
        verbose_json and the diarization worker's turns, asked for at once and aligned (each
        worker's usage counted under the client's key id)."""
        if upload.get("response_format") not in (None, "json", "verbose_json"):
            raise InvalidRequest("diarize=true returns verbose_json; drop response_format or "
                                 "set it to verbose_json", param="response_format")
        diarizer = self._diarizer(upload)
        audio = await extract_file_async(upload)  # reads the whole spool: off the loop
        try:
            transcript, diarized = await self._transcript_and_turns(
                upload, audio, speech, diarizer, path, authorization, voices=False)
        finally:
            audio.close()
        return JSONResponse(assign_speakers(transcript, diarized.get("segments", [])))

    async def _diarized_json(self, upload: Upload, speech: ModelSpec,
                             authorization: bytes | None) -> ASGIApp:
        """OpenAI's TranscriptionDiarized (diarized_json.py): the diarize=true transcript in
        OpenAI's shape, its speakers named by the known speakers' reference clips when given
        (each clip's voice from the diarization worker, compared with each speaker's)."""
        names = known_speaker_names(upload.fields, reference_count(upload.fields))
        threshold = known_speaker_threshold(upload.fields)
        stream = _true(upload.get("stream"))
        diarizer = self._diarizer(upload)
        with ExitStack() as files:
            clips = await asyncio.to_thread(_reference_clips, upload) if names else []
            for clip in clips:
                files.callback(clip.close)
            known = [(name, await self._voice(diarizer, clip, i, authorization))
                     for i, (name, clip) in enumerate(zip(names, clips, strict=True))]
            audio = await extract_file_async(upload)  # reads the whole spool: off the loop
            files.callback(audio.close)
            transcript, diarized = await self._transcript_and_turns(
                upload, audio, speech, diarizer, "/audio/transcriptions", authorization,
                voices=bool(known))
        labelled = assign_speakers(transcript, diarized.get("segments", []))
        voices = diarized.get("speaker_embeddings")
        matched = match_speakers(voices, known, threshold) \
            if known and isinstance(voices, dict) else {}
        body = diarized_json(labelled, matched)
        if stream:
            return Response(stream_events(body), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache"})
        return JSONResponse(body)

    def _diarizer(self, upload: Upload) -> ModelSpec:
        name = upload.get("diarization_model") or DEFAULT_DIARIZATION_MODEL
        diarizer = self.registry.resolve(name)
        if diarizer.task is not Task.diarization:
            raise InvalidRequest(f"model '{diarizer.id}' is not a diarization model",
                                 param="diarization_model")
        return diarizer

    async def _transcript_and_turns(self, upload: Upload, audio: IO[bytes], speech: ModelSpec,
                                    diarizer: ModelSpec, path: str,
                                    authorization: bytes | None, voices: bool
                                    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The speech worker's verbose_json (segments and words) and the diarization worker's
        turns (with each speaker's voice when `voices`), each worker's usage counted under
        the client's key id."""
        filename = upload.filenames.get("file") or "audio"
        transcript_form = _form(audio, filename, upload, ("model", "language", "prompt",
                                                          "temperature"))
        transcript_form.add("response_format", "verbose_json")
        transcript_form.add("timestamp_granularities[]", "segment")
        transcript_form.add("timestamp_granularities[]", "word")
        turns_form = _form(audio, filename, upload, ("num_speakers", "min_speakers",
                                                     "max_speakers"))
        turns_form.add("model", diarizer.id)
        if voices:
            turns_form.add("speaker_embeddings", "true")
        transcript = await self.relay.fetch_json(self.registry.models[speech.id], path,
                                                 transcript_form, authorization)
        diarized = await self.relay.fetch_json(self.registry.models[diarizer.id],
                                               "/audio/diarization", turns_form, authorization)
        return _object(transcript), _object(diarized)

    async def _voice(self, diarizer: ModelSpec, clip: IO[bytes], index: int,
                     authorization: bytes | None) -> list[float]:
        """A known speaker's reference clip → its voice embedding (the diarization worker's
        /audio/speaker_embedding); the clip's faults are told as the reference's."""
        form = Multipart(file_path=Path(clip.name), filename=f"reference-{index}")
        form.add("model", diarizer.id)
        form.add("max_seconds", str(REFERENCE_MAX_SECONDS))
        where = f"known_speaker_references[{index}]"
        try:
            answer = _object(await self.relay.fetch_json(
                self.registry.models[diarizer.id], "/audio/speaker_embedding", form,
                authorization))
        except ModelhostError as exc:
            if exc.type != "invalid_request_error":
                raise
            code = "invalid_value"
            if exc.code == "audio_too_long":
                message = f"is longer than {REFERENCE_MAX_SECONDS:g} seconds"
            elif exc.code == "unsupported_parameter":  # an engine that does not embed voices
                message, code = f"cannot be matched: {exc.message}", exc.code
            else:
                message = f"was refused: {exc.message}"
            raise InvalidRequest(f"{where} {message}", param="known_speaker_references",
                                 code=code) from exc
        duration = float(answer.get("duration") or 0.0)
        embedding = answer.get("embedding")
        if duration < REFERENCE_MIN_SECONDS:
            raise InvalidRequest(
                f"{where} is {duration:.2f} seconds long; a reference must be between "
                f"{REFERENCE_MIN_SECONDS:g} and {REFERENCE_MAX_SECONDS:g} seconds.",
                param="known_speaker_references", code="invalid_value")
        if not isinstance(embedding, list) or not embedding:
            raise InvalidRequest(f"{where}: the diarization model '{diarizer.id}' gave no "
                                 "voice embedding", param="known_speaker_references")
        return [float(x) for x in embedding]

    def _check(self, upload: Upload, task: Task, path: str) -> ModelSpec:
        if "file" not in upload.files:
            raise InvalidRequest("Missing required parameter: 'file'.", param="file")
        if upload.files["file"] == 0:
            raise InvalidRequest("The audio file is empty.", param="file",
                                 code="empty_file")
        name = upload.get("model")
        if not name and task is Task.diarization:
            name = DEFAULT_DIARIZATION_MODEL
        if not name:
            raise InvalidRequest("you must provide a model parameter", param="model")
        spec = self.registry.resolve(name)
        if spec.task is not task:
            verb = "transcribe" if task is Task.transcription else "diarize"
            raise InvalidRequest(f"model '{spec.id}' is a {spec.task.value} model and does not "
                                 f"{verb} audio", param="model", code="model_not_supported")
        if task is Task.diarization:
            return spec
        formats = RESPONSE_FORMATS | {DIARIZED_JSON} if path == "/audio/transcriptions" \
            else RESPONSE_FORMATS
        response_format = upload.get("response_format")
        if response_format is not None and response_format not in formats:
            raise InvalidRequest(
                f"'{response_format}' is not one of {sorted(formats)} - "
                "'response_format'", param="response_format")
        chunking_strategy(upload.fields)  # accepted when valid, as at OpenAI; see its module
        return spec



def _true(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("true", "1", "yes", "on")


def _object(answer: Any) -> dict[str, Any]:
    return answer if isinstance(answer, dict) else {}


def _reference_clips(upload: Upload) -> list[IO[bytes]]:
    """The known speakers' reference clips, each decoded from its data URL into a temporary
    file (deleted when closed). The fields are read from the spool again, whole: the upload's
    parse kept only their first 64 KiB (a clip's data URL is larger). Blocking: call it in a
    thread."""
    _, params = parse_options_header(upload.content_type)
    values: list[bytearray] = []
    state: dict[str, Any] = {"header": b"", "value": b"", "keep": False}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        if state["header"].lower() == b"content-disposition":
            _, disposition = parse_options_header(state["value"])
            state["keep"] = disposition.get(b"name", b"").decode("utf-8", "replace") \
                in REFERENCES and b"filename" not in disposition
            if state["keep"]:
                values.append(bytearray())
        state["header"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["keep"]:
            values[-1] += data[start:end]

    def on_part_end() -> None:
        state["keep"] = False

    parser = new_parser(params[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }, max_part_header_bytes=max(16 * 1024, upload.size))
    upload.body.seek(0)
    while chunk := upload.body.read(1 << 20):
        parser.write(chunk)
    parser.finalize()
    upload.body.seek(0)
    clips: list[IO[bytes]] = []
    try:
        for i, value in enumerate(values):
            data = decode_data_url(value.decode("utf-8", "replace"), i)
            clip = tempfile.NamedTemporaryFile(prefix="modelhost-reference-")  # noqa: SIM115
            clips.append(clip)
            clip.write(data)
            clip.flush()
    except BaseException:
        for made in clips:
            made.close()
        raise
    return clips


def _form(audio: IO[bytes], filename: str, upload: Upload,
          names: tuple[str, ...]) -> Multipart:
    """A multipart form with the audio (streamed from its file when sent) and some of the
    client's fields."""
    form = Multipart(file_path=Path(audio.name), filename=filename)
    for name in names:
        for value in upload.fields.get(name, []):
            form.add(name, value)
    return form

