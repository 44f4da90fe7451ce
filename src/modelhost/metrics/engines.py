"""The engines' own metrics, relayed: each ready local worker's `/metrics`, fetched when
/metrics is scraped, re-emitted with a `model` label added, so that one scrape sees the
gateway and every engine (vLLM serves one; llama.cpp's server with `--metrics`).

How it stays harmless to the scrape and to the gateway:
- fetched through the gateway's own HTTP client (`upstream.UpstreamClient`, the relay's),
  all workers at once, each within `ENGINE_TIMEOUT` seconds and `ENGINE_BYTES` bytes: a slow,
  broken or oversized answer is left out of this scrape (logged at debug level), never fails
  it;
- a worker that has no /metrics (404: modelhost's own apps, llama.cpp without `--metrics`) is
  remembered and not asked again until it is a new worker (a restart, a reload);
- parsed (`prometheus_client.parser`) and written out in a thread, off the event loop;
- families of the same name from several workers are merged into one (one `# TYPE` line);
  a family whose type differs from the first one seen, whose samples another family
  writes, or named like the gateway's own (`modelhost_*`), is dropped; a `model` label the
  engine set itself is kept as `exported_model` (what Prometheus does with a clashing target label).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from modelhost.registry.lifecycle import State
from modelhost.registry.model import Model
from modelhost.upstream import UpstreamClient

log = logging.getLogger(__name__)

ENGINE_TIMEOUT = 2.0  # seconds for one worker's /metrics, connecting included
ENGINE_BYTES = 4 * 1024 * 1024  # at most this much of one worker's /metrics is read


class EngineRelay:
    """Fetches and relabels the engines' metrics; `scrape()` returns exposition text."""

    def __init__(self, models: Callable[[], Iterable[Model]], client: UpstreamClient,
                 timeout: float = ENGINE_TIMEOUT, limit: int = ENGINE_BYTES) -> None:
        self.models = models
        self.client = client
        self.timeout = timeout
        self.limit = limit
        # model id -> the worker (pid, start time) that answered 404: not asked again.
        self._without: dict[str, tuple[int, float]] = {}

    async def scrape(self) -> bytes:
        targets = []
        for model in list(self.models()):
            worker = model.worker
            if model.state is not State.ready or worker is None or worker.pid is None:
                continue  # not running, or a remote server (not ours to scrape)
            identity = (worker.pid, worker.started_at)
            if self._without.get(model.spec.id) == identity:
                continue
            targets.append((model.spec.id, identity, _origin(worker.base_url)))
        if not targets:
            return b""
        texts = await asyncio.gather(*(self._fetch(*target) for target in targets))
        found = [(target[0], text) for target, text in zip(targets, texts, strict=True)
                 if text]
        if not found:
            return b""
        try:
            return await asyncio.to_thread(relabel, found)
        except Exception:  # whatever an engine wrote, the gateway's own figures still go out
            log.warning("the engines' metrics could not be relayed", exc_info=True)
            return b""

    async def _fetch(self, model_id: str, identity: tuple[int, float], base: str
                     ) -> str | None:
        try:
            async with asyncio.timeout(self.timeout):
                resp = await self.client.request(
                    base, "GET", "/metrics", {"Accept": "text/plain; version=0.0.4"})
                if resp.status != 200:
                    resp.close()
                    if resp.status == 404:
                        self._without[model_id] = identity
                    else:
                        log.debug("metrics of %s: status %d", model_id, resp.status)
                    return None
                body = await resp.read(self.limit)
        except OSError as exc:  # every failure of the client, timeouts and oversize included
            log.debug("metrics of %s not read: %r", model_id, exc)
            return None
        return body.decode("utf-8", errors="replace")


def _origin(base_url: str) -> str:
    """A worker's base URL (`http://127.0.0.1:PORT/v1`) without its path."""
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}"


def relabel(found: list[tuple[str, str]]) -> bytes:
    """Parse each model's exposition text and write all of them as one, each sample with
    `model` set to its model's id."""
    families: dict[str, Metric] = {}
    owners: dict[str, str] = {}  # sample name -> the family that writes it
    for model_id, text in found:
        try:
            parsed = list(text_string_to_metric_families(text))
        except Exception as exc:  # the parser raises ValueError and more on bad input
            log.debug("metrics of %s not parsed: %r", model_id, exc)
            continue
        for family in parsed:
            if family.name.startswith("modelhost_"):
                continue
            names = {sample.name for sample in family.samples}
            if any(owners.get(name, family.name) != family.name for name in names):
                continue  # a counter `x` and a gauge `x_total` would both write `x_total`
            owners.update(dict.fromkeys(names, family.name))
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            elif merged.type != family.type:
                continue
            for sample in family.samples:
                labels = dict(sample.labels)
                if "model" in labels:
                    labels["exported_model"] = labels.pop("model")
                labels["model"] = model_id
                merged.samples.append(Sample(sample.name, labels, sample.value,
                                             sample.timestamp, sample.exemplar))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families
