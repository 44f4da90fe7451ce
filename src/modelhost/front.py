"""The gateway's ASGI app: the hot /v1 routes first, everything else through FastAPI.

A chat, completion or embeddings request is matched by its exact path, its key checked, and its
route (`api/openai.py`'s `RelayEndpoint`) called straight from the server. FastAPI's middleware
stack, router and request objects took about 10 % of the gateway's CPU per request before this
path existed (docs/benchmarks.md), and none of them does anything for these routes. Every other
request (admin API, audio, models, health, a method or path the fast table does not hold) goes
to the FastAPI app, which has its own key check; the two share one `KeyGuard`.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from modelhost.auth import KeyGuard


class Front:
    def __init__(self, app: FastAPI, guard: KeyGuard, routes: Mapping[str, ASGIApp]) -> None:
        self.app = app
        self.guard = guard
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.routes.get(scope["path"])
            if route is not None:
                error = self.guard.check(scope)
                if error is not None:
                    await self.guard.refuse(error, scope, receive, send)
                else:
                    await route(scope, receive, send)
                return
        await self.app(scope, receive, send)
