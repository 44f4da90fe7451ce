"""The OpenAI-compatible routes under /v1: which routes exist, what each checks, and the
models list.

The relayed JSON routes (chat, completions, embeddings) are declared here and served by
`serving.endpoint.RelayEndpoint`: raw ASGI apps that read the body, check it, and relay it, with
no Starlette request or response objects on the way. The server calls them straight from the
wire (`serving/wire.py`), `serving/front.py` ahead of FastAPI's routing and middleware; they
are also mounted as ordinary routes (so that other methods get 405, and a test client that goes
through FastAPI sees the same thing).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelhost.api import requests as req
from modelhost.config import Task
from modelhost.errors import ModelNotFound
from modelhost.registry.model import Model
from modelhost.registry.registry import Registry
from modelhost.serving.call import Relay
from modelhost.serving.endpoint import RelayEndpoint

# The relayed routes: path under /v1 -> (the worker's path, the body's check, the tasks).
RELAYED = {
    "/v1/chat/completions": ("/chat/completions", req.check_chat, {Task.chat}),
    "/v1/completions": ("/completions", req.check_completion, {Task.chat, Task.completion}),
    "/v1/embeddings": ("/embeddings", req.check_embedding, {Task.embedding}),
}


class OpenAIRoutes:
    def __init__(self, registry: Registry, relay: Relay, max_request_bytes: int) -> None:
        self.registry = registry
        self.relay = relay
        self.max_request_bytes = max_request_bytes
        self.created = int(time.time())
        # The relayed routes by path (all POST): mounted below, and called by `front.py`.
        self.relay_endpoints = self._relay_endpoints()

    def _relay_endpoints(self) -> dict[str, RelayEndpoint]:
        return {route: RelayEndpoint(self.registry, self.relay, self.max_request_bytes, path,
                                     check, tasks)
                for route, (path, check, tasks) in RELAYED.items()}

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            *(Route(path, endpoint, methods=["POST"])
              for path, endpoint in self.relay_endpoints.items()),
        ]

    def model_card(self, rt: Model) -> dict[str, Any]:
        """A model as inference clients see it. The reason of a failure (worker output,
        addresses, paths) is for operators: only the admin API shows it."""
        spec = rt.spec
        return {
            "id": spec.id, "object": "model", "created": self.created, "owned_by": "modelhost",
            "task": spec.task.value, "backend": spec.backend.value, "aliases": spec.aliases,
            "state": rt.state.value,
            "last_error": "failed" if rt.last_error and rt.state.value == "failed" else None,
        }

    async def list_models(self, request: Request) -> Response:
        cards = [self.model_card(rt) for rt in self.registry.models.values()]
        return JSONResponse({"object": "list", "data": cards})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if request.scope["path"] != f"/v1/models/{name}":
            # The route matches with `$`, which also matches before a final newline: the id
            # asked for is not the one matched (`/v1/models/abc%0A` is not model `abc`).
            raise ModelNotFound(f"The model '{request.scope['path'][11:]}' does not exist",
                                param="model")
        return JSONResponse(self.model_card(self.registry.model(name)))
