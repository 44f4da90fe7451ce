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

from collections.abc import Awaitable, Callable, Mapping

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from modelhost.api.openai import RelayEndpoint
from modelhost.asgi import Answer, error_answer, too_large
from modelhost.auth import KeyGuard
from modelhost.relay import RelayStream
from modelhost.server import HotCycle, raise_in_step
from modelhost.settings import Settings


class Front:
    def __init__(self, app: FastAPI, guard: KeyGuard, routes: Mapping[str, RelayEndpoint],
                 settings: Settings | None = None) -> None:
        self.app = app
        self.guard = guard
        self.settings = settings
        # Set by the server on SIGTERM: new requests get 503, /ready too (graceful stop).
        self.draining = False
        self.routes: dict[str, ASGIApp] = dict(routes)
        self.hot_routes = {path.encode("ascii"): HotRelay(guard, endpoint)
                           for path, endpoint in routes.items()}

    def gate(self, method: bytes, path: str, headers: list[tuple[bytes, bytes]]
             ) -> Answer | None:
        """The refusal of a request judged on its head alone (wrong Host, foreign Origin,
        missing or wrong key for the route, draining), or None to go on. The server calls it
        when a request's headers are complete, before reading or asking for its body."""
        return None

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

    def start(self, cycle: HotCycle) -> bool:
        """Serve the request from callbacks if nothing has to be waited for
        (`RelayEndpoint.start`); False to be awaited instead."""
        if cycle.too_large:
            return False
        error = self.guard.check(cycle.headers)
        if error is not None:
            _CycleReply(self, cycle).send(self.guard.refusal(error))
            return True
        return self.endpoint.start(bytes(cycle.body), _CycleReply(self, cycle))

    async def __call__(self, cycle: HotCycle) -> None:
        error = self.guard.check(cycle.headers)
        if error is not None:
            answer: Answer | ASGIApp = self.guard.refusal(error)
        elif cycle.too_large:
            answer = error_answer(too_large(self.limit, cycle.declared))
        else:
            answer = await self.endpoint.answer(cycle.take_body(), cycle.asgi()[0])
        await _deliver(cycle, answer)

    async def finish(self, cycle: HotCycle, step: Callable[[], Awaitable[Answer | RelayStream]]
                     ) -> None:
        await _deliver(cycle, await self.endpoint.settle(step, cycle.asgi()[0]))


async def _deliver(cycle: HotCycle, answer: Answer | ASGIApp) -> None:
    if isinstance(answer, Answer):
        cycle.answer(answer.status, answer.headers, answer.body)
    else:
        await answer(*cycle.asgi())


class _CycleReply:
    """`relay.Reply` on a hot cycle."""

    __slots__ = ("cycle", "route")

    def __init__(self, route: HotRelay, cycle: HotCycle) -> None:
        self.route = route
        self.cycle = cycle

    def send(self, answer: Answer) -> None:
        try:
            self.cycle.answer(answer.status, answer.headers, answer.body)
        except Exception as exc:  # called from a callback, which must not raise
            self.cycle.go_on(raise_in_step(exc))

    def resume(self, step: Callable[[], Awaitable[Answer | RelayStream]] | None) -> None:
        route = self.route
        if step is None:
            self.cycle.go_on(route)
        else:
            self.cycle.go_on(lambda cycle: route.finish(cycle, step))
