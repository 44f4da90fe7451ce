"""`Metrics`: one app's metrics, behind GET /metrics.

Each app built (`app.build_app`) has its own `Metrics` with its own
`prometheus_client.CollectorRegistry`, never prometheus_client's global default one: tests
build several apps in one process, and the gateway's metrics are its own (no process or
platform collectors of the client library's choosing).

    metrics.registry   the CollectorRegistry: register collectors here (the serving layer's
                       per-request `requests.RequestMetrics` is registered on it in build_app)
    metrics.lifecycle  `collectors.LifecycleMetrics`, a listener of the models' state changes
    metrics.engines    `engines.EngineRelay`, the workers' own /metrics
    await metrics.render()   the exposition text of a scrape

A scrape is the registry's text (`exposition.render`: what `generate_latest` gives, cheaper;
the collectors read what the models, the admission and the GPU monitor already keep)
followed by the engines' metrics, relabelled.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from modelhost.metrics.collectors import (
    GpuCollector,
    InfoCollector,
    LifecycleMetrics,
    ModelCollector,
)
from modelhost.metrics.engines import EngineRelay
from modelhost.metrics.exposition import render
from modelhost.registry.registry import Registry
from modelhost.upstream import UpstreamClient


class Metrics:
    """The metrics of one app over its model registry; `client` is the gateway's own HTTP
    client (the relay's), through which the engines' metrics are fetched."""

    def __init__(self, models: Registry, client: UpstreamClient) -> None:
        # Ours alone: collectors registered here, and nowhere else, are scraped.
        self.registry = CollectorRegistry(auto_describe=False)
        self.lifecycle = LifecycleMetrics(self.registry)
        models.add_listener(self.lifecycle.changed)
        self.registry.register(InfoCollector())
        self.registry.register(ModelCollector(models, self.lifecycle))
        self.registry.register(GpuCollector(models.gpus))
        self.engines = EngineRelay(lambda: models.models.values(), client)

    async def render(self) -> bytes:
        """The text of one scrape (Prometheus text format 0.0.4)."""
        own = render(self.registry)
        return own + await self.engines.scrape()
