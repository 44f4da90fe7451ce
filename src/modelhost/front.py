"""The gateway's ASGI app: the hot /v1 routes first, everything else through FastAPI.

A chat, completion or embeddings request is matched by its exact path, its key checked, and its
route (`api/openai.py`'s `RelayEndpoint`) called straight from the server. FastAPI's middleware
stack, router and request objects took about 10 % of the gateway's CPU per request before this
path existed (docs/benchmarks.md), and none of them does anything for these routes. Every other
request (admin API, audio, models, health, a method or path the fast table does not hold) goes
to the FastAPI app, which has its own key check; the two share one `KeyGuard`.

The same routes are also offered to the HTTP server as `hot_routes` (`server.py`), which calls
them without going through ASGI at all; `Front.__call__` serves them when the server does not
(another server, a test client, or uvicorn with its access log on).
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from modelhost.api.openai import RelayEndpoint
from modelhost.asgi import Answer, error_answer, too_large
from modelhost.auth import KeyGuard
from modelhost.server import HotCycle


class Front:
    def __init__(self, app: FastAPI, guard: KeyGuard, routes: Mapping[str, RelayEndpoint]
                 ) -> None:
        self.app = app
        self.guard = guard
        self.routes: dict[str, ASGIApp] = dict(routes)
        self.hot_routes = {path.encode("ascii"): HotRelay(guard, endpoint)
                           for path, endpoint in routes.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.routes.get(scope["path"])
            if route is not None:
                error = self.guard.check(scope["headers"])
                if error is not None:
                    await self.guard.refusal(error)(scope, receive, send)
                else:
                    await route(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HotRelay:
    """A relayed route as the server's hot path calls it (`server.HotRoute`)."""

    def __init__(self, guard: KeyGuard, endpoint: RelayEndpoint) -> None:
        self.guard = guard
        self.endpoint = endpoint
        self.limit = endpoint.max_request_bytes

    async def __call__(self, cycle: HotCycle) -> None:
        scope, receive, send = cycle.asgi()
        error = self.guard.check(cycle.headers)
        if error is not None:
            answer: Answer | ASGIApp = self.guard.refusal(error)
        elif cycle.too_large:
            answer = error_answer(too_large(self.limit, cycle.declared))
        else:
            answer = await self.endpoint.answer(cycle.take_body(), scope)
        if isinstance(answer, Answer):
            cycle.answer(answer.status, answer.headers, answer.body)
        else:
            await answer(scope, receive, send)
