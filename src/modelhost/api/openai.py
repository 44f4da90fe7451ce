"""The OpenAI-compatible routes under /v1: thin handlers over the registry and the relay."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelhost.api import requests as req
from modelhost.config import Task, UrlSource
from modelhost.errors import InvalidRequest
from modelhost.registry.registry import Registry
from modelhost.registry.runtime import ModelRuntime
from modelhost.relay import Relay

Check = Callable[[dict[str, Any]], None]


class OpenAIRoutes:
    def __init__(self, registry: Registry, relay: Relay, max_request_bytes: int) -> None:
        self.registry = registry
        self.relay = relay
        self.max_request_bytes = max_request_bytes
        self.created = int(time.time())

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/v1/chat/completions", self._relay_route(
                "/chat/completions", req.check_chat, {Task.chat}), methods=["POST"]),
            Route("/v1/completions", self._relay_route(
                "/completions", req.check_completion, {Task.chat, Task.completion}),
                methods=["POST"]),
            Route("/v1/embeddings", self._relay_route(
                "/embeddings", req.check_embedding, {Task.embedding}), methods=["POST"]),
        ]

    def model_card(self, rt: ModelRuntime) -> dict[str, Any]:
        spec = rt.spec
        return {
            "id": spec.id, "object": "model", "created": self.created, "owned_by": "modelhost",
            "task": spec.task.value, "backend": spec.backend.value, "aliases": spec.aliases,
            "state": rt.state.value, "last_error": rt.last_error,
        }

    async def list_models(self, request: Request) -> Response:
        cards = [self.model_card(rt) for rt in self.registry.runtimes.values()]
        return JSONResponse({"object": "list", "data": cards})

    async def get_model(self, request: Request) -> Response:
        return JSONResponse(self.model_card(self.registry.runtime(request.path_params["model"])))

    def _relay_route(self, path: str, check: Check, tasks: set[Task]
                     ) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            body = await req.read_body(request, self.max_request_bytes)
            payload = req.parse_json(body)
            name = req.require_model(payload)
            spec = self.registry.resolve(name)
            if spec.task not in tasks:
                raise InvalidRequest(
                    f"model '{spec.id}' is a {spec.task.value} model and does not serve "
                    f"{path}", param="model", code="model_not_supported")
            check(payload)
            upstream_name = spec.source.model if isinstance(spec.source, UrlSource) \
                and spec.source.model else spec.id
            if name != upstream_name:
                # The worker knows the model by its id (or its remote name), not an alias.
                payload["model"] = upstream_name
                body = json.dumps(payload).encode()
            headers = {"Content-Type": "application/json"}
            if isinstance(spec.source, UrlSource) and spec.source.api_key:
                headers["Authorization"] = f"Bearer {spec.source.api_key}"
            return await self.relay.forward(self.registry.runtimes[spec.id],
                                            self.registry.admissions[spec.id], path, body,
                                            headers)

        return endpoint
