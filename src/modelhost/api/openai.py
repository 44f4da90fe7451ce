"""The OpenAI-compatible routes under /v1: thin handlers over the registry and the relay.

The relayed JSON routes (chat, completions, embeddings) are raw ASGI apps: they read the body,
check what the gateway needs, and hand the bytes to the relay, with no Starlette request or
response objects on the way. `front.py` calls them straight from the server, ahead of FastAPI's
routing and middleware; they are also mounted as ordinary routes (so that other methods get 405,
and a test client that goes through FastAPI sees the same thing).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from modelhost.api import requests as req
from modelhost.asgi import Answer, ClientGone, error_answer, read_body, unexpected_answer
from modelhost.config import ModelSpec, Task, UrlSource
from modelhost.errors import InvalidRequest, ModelhostError, ModelNotFound
from modelhost.registry.model import Model
from modelhost.registry.registry import Registry
from modelhost.relay import Relay, RelayStream, Reply

Check = Callable[[dict[str, Any]], None]


class OpenAIRoutes:
    def __init__(self, registry: Registry, relay: Relay, max_request_bytes: int) -> None:
        self.registry = registry
        self.relay = relay
        self.max_request_bytes = max_request_bytes
        self.created = int(time.time())
        # The relayed routes by path (all POST): mounted below, and called by `front.py`.
        self.relay_endpoints = self._relay_endpoints()

    def _relay_endpoints(self) -> dict[str, RelayEndpoint]:
        return {
            "/v1/chat/completions": RelayEndpoint(self, "/chat/completions", req.check_chat,
                                                  {Task.chat}),
            "/v1/completions": RelayEndpoint(self, "/completions", req.check_completion,
                                             {Task.chat, Task.completion}),
            "/v1/embeddings": RelayEndpoint(self, "/embeddings", req.check_embedding,
                                            {Task.embedding}),
        }

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



class RelayEndpoint:
    """One relayed JSON route, as an ASGI app that answers every error itself."""

    def __init__(self, routes: OpenAIRoutes, path: str, check: Check, tasks: set[Task]) -> None:
        self.registry = routes.registry
        self.relay = routes.relay
        self.max_request_bytes = routes.max_request_bytes
        self.path = path
        self.check = check
        self.tasks = tasks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await read_body(scope, receive, self.max_request_bytes)
        except ModelhostError as exc:
            answer: Answer | RelayStream = error_answer(exc)
        except ClientGone:
            return
        else:
            answer = await self.answer(body, scope)
        await answer(scope, receive, send)

    async def answer(self, body: bytes, scope: Scope, gone: Callable[[], bool] | None = None
                     ) -> Answer | RelayStream:
        """The answer to a request whose body is `body`, errors included (`gone`: whether
        the client has left, see `Relay.forward`)."""
        return await self.settle(lambda: self.handle(body, gone), scope)

    async def settle(self, step: Callable[[], Awaitable[Answer | RelayStream]], scope: Scope
                     ) -> Answer | RelayStream:
        """What `step` answers, or the error answer for what it raised."""
        try:
            return await step()
        except ModelhostError as exc:
            return error_answer(exc)
        except Exception:
            return unexpected_answer(scope)

    async def handle(self, body: bytes, gone: Callable[[], bool] | None = None
                     ) -> Answer | RelayStream:
        spec, body, headers = self._prepare(body)
        return await self.relay.forward(self.registry.models[spec.id], self.path, body,
                                        headers, gone)

    def start(self, body: bytes, reply: Reply) -> bool:
        """Serve the request without a task if nothing has to be waited for (`Relay.start`);
        False, with nothing sent, when it must go the async way (`answer`). An invalid
        request is answered here."""
        try:
            spec, body, headers = self._prepare(body)
        except ModelhostError as exc:
            reply.send(error_answer(exc))
            return True
        except Exception:
            return False  # `answer` meets it again, and logs it
        return self.relay.start(self.registry.models[spec.id], self.path, body, headers,
                                reply)

    def _prepare(self, body: bytes) -> tuple[ModelSpec, bytes, dict[str, str]]:
        """Check the request; the model, and the body and headers to send to its worker."""
        payload = req.parse_json(body)
        name = req.require_model(payload)
        spec = self.registry.resolve(name)
        if spec.task not in self.tasks:
            raise InvalidRequest(
                f"model '{spec.id}' is a {spec.task.value} model and does not serve "
                f"{self.path}", param="model", code="model_not_supported")
        self.check(payload)
        source = spec.source if isinstance(spec.source, UrlSource) else None
        upstream_name = source.model if source is not None and source.model else spec.id
        if name != upstream_name:
            # The worker knows the model by its id (or its remote name), not an alias.
            payload["model"] = upstream_name
            body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if source is not None and source.api_key:
            headers["Authorization"] = f"Bearer {source.api_key}"
        return spec, body, headers
