"""Liveness and readiness, for load balancers and orchestrators (not behind the API key).

`/ready` answers 503 as soon as the server starts draining (SIGTERM), so that a load balancer
stops sending new requests while those in flight finish; `/health` stays 200 until the end.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelhost.registry.registry import Registry


def health_routes(registry: Registry, draining: Callable[[], bool] = lambda: False
                  ) -> list[Route]:
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if draining():
            return JSONResponse({"status": "draining"}, status_code=503,
                                headers={"Retry-After": "5"})
        waiting = registry.not_ready_required()
        models = {rt.spec.id: rt.state.value for rt in registry.models.values()}
        if waiting:
            return JSONResponse({"status": "not_ready", "waiting_for": waiting,
                                 "models": models}, status_code=503)
        return JSONResponse({"status": "ready", "models": models})

    return [Route("/health", health, methods=["GET"]), Route("/ready", ready, methods=["GET"])]
