"""GET /metrics: the Prometheus text format of `metrics.Metrics` (the gateway's figures and
the engines' own, relayed).

An admin route (`auth.ADMIN_PREFIXES`): with keys configured, Prometheus sends an admin key
(`Authorization: Bearer ...`, its scrape config's `authorization.credentials_file`); with no
keys at all (a loopback dev server), it is open like the rest.
"""

from __future__ import annotations

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modelhost.metrics import Metrics


def metrics_routes(metrics: Metrics) -> list[Route]:
    async def scrape(request: Request) -> Response:
        return Response(await metrics.render(), headers={
            "Content-Type": CONTENT_TYPE_PLAIN_0_0_4, "Cache-Control": "no-store"})

    return [Route("/metrics", scrape, methods=["GET"])]
