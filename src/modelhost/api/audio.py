"""The OpenAI audio routes: transcriptions and translations, relayed to speech workers."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modelhost.api.uploads import Upload, spool_multipart
from modelhost.config import ModelSpec, Task
from modelhost.errors import InvalidRequest
from modelhost.registry.registry import Registry
from modelhost.relay import Relay

RESPONSE_FORMATS = {"json", "text", "srt", "vtt", "verbose_json"}


class AudioRoutes:
    def __init__(self, registry: Registry, relay: Relay, max_upload_bytes: int,
                 spool_dir: Path | None = None) -> None:
        self.registry = registry
        self.relay = relay
        self.max_upload_bytes = max_upload_bytes
        self.spool_dir = spool_dir

    def routes(self) -> list[Route]:
        return [
            Route("/v1/audio/transcriptions", self.transcriptions, methods=["POST"]),
            Route("/v1/audio/translations", self.translations, methods=["POST"]),
        ]

    async def transcriptions(self, request: Request) -> Response:
        return await self._relay(request, "/audio/transcriptions")

    async def translations(self, request: Request) -> Response:
        return await self._relay(request, "/audio/translations")

    async def _relay(self, request: Request, path: str) -> Response:
        upload = await spool_multipart(request, self.max_upload_bytes, self.spool_dir)
        try:
            spec = self._check(upload)
            # The body goes to the worker exactly as it came; its `model` field may be an
            # alias, which our speech worker ignores (it serves one model).
            return await self.relay.forward(
                self.registry.runtimes[spec.id], self.registry.admissions[spec.id], path,
                upload.body, {"Content-Type": upload.content_type})
        finally:
            upload.close()

    def _check(self, upload: Upload) -> ModelSpec:
        if "file" not in upload.files:
            raise InvalidRequest("Missing required parameter: 'file'.", param="file")
        if upload.files["file"] == 0:
            raise InvalidRequest("The audio file is empty.", param="file",
                                 code="empty_file")
        name = upload.get("model")
        if not name:
            raise InvalidRequest("you must provide a model parameter", param="model")
        spec = self.registry.resolve(name)
        if spec.task is not Task.transcription:
            raise InvalidRequest(f"model '{spec.id}' is a {spec.task.value} model and does not "
                                 "transcribe audio", param="model", code="model_not_supported")
        response_format = upload.get("response_format")
        if response_format is not None and response_format not in RESPONSE_FORMATS:
            raise InvalidRequest(
                f"'{response_format}' is not one of {sorted(RESPONSE_FORMATS)} - "
                "'response_format'", param="response_format")
        return spec

