"""The OpenAI audio routes: transcriptions and translations, relayed to speech workers.

Uploads are bounded (uploads.py: body size, parts, header bytes per part; 413 past any) and
parsed off the event loop; the audio's duration is bounded by the workers themselves
(`--max-audio-seconds`, settings.max_audio_seconds), whose 413 the relay passes on."""

from __future__ import annotations

from pathlib import Path
from typing import IO

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from modelhost.api.uploads import Upload, extract_file_async, spool_multipart
from modelhost.catalog import DEFAULT_DIARIZATION_MODEL
from modelhost.config import ModelSpec, Task
from modelhost.diarize import assign_speakers
from modelhost.errors import InvalidRequest
from modelhost.logs import request_id as bound_request_id
from modelhost.registry.registry import Registry
from modelhost.requestid import from_headers
from modelhost.serving.call import Relay
from modelhost.serving.endpoint import RelayEndpoint
from modelhost.upstream import Multipart

RESPONSE_FORMATS = {"json", "text", "srt", "vtt", "verbose_json"}


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
            spec = self._check(upload, task)
            authorization = next((v for k, v in request.scope["headers"]
                                  if k == b"authorization"), None)
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
        name = upload.get("diarization_model") or DEFAULT_DIARIZATION_MODEL
        diarizer = self.registry.resolve(name)
        if diarizer.task is not Task.diarization:
            raise InvalidRequest(f"model '{diarizer.id}' is not a diarization model",
                                 param="diarization_model")
        audio = await extract_file_async(upload)  # reads the whole spool: off the loop
        filename = upload.filenames.get("file") or "audio"
        try:
            transcript_form = _form(audio, filename, upload, ("model", "language", "prompt",
                                                              "temperature"))
            transcript_form.add("response_format", "verbose_json")
            transcript_form.add("timestamp_granularities[]", "segment")
            transcript_form.add("timestamp_granularities[]", "word")
            turns_form = _form(audio, filename, upload, ("num_speakers", "min_speakers",
                                                         "max_speakers"))
            turns_form.add("model", diarizer.id)
            transcript = await self.relay.fetch_json(self.registry.models[speech.id], path,
                                                     transcript_form, authorization)
            diarized = await self.relay.fetch_json(self.registry.models[diarizer.id],
                                                   "/audio/diarization", turns_form,
                                                   authorization)
        finally:
            audio.close()
        return JSONResponse(assign_speakers(transcript, diarized.get("segments", [])))

    def _check(self, upload: Upload, task: Task) -> ModelSpec:
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
        response_format = upload.get("response_format")
        if response_format is not None and response_format not in RESPONSE_FORMATS:
            raise InvalidRequest(
                f"'{response_format}' is not one of {sorted(RESPONSE_FORMATS)} - "
                "'response_format'", param="response_format")
        return spec



def _true(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("true", "1", "yes", "on")


def _form(audio: IO[bytes], filename: str, upload: Upload,
          names: tuple[str, ...]) -> Multipart:
    """A multipart form with the audio (streamed from its file when sent) and some of the
    client's fields."""
    form = Multipart(file_path=Path(audio.name), filename=filename)
    for name in names:
        for value in upload.fields.get(name, []):
            form.add(name, value)
    return form

