"""The gateway's Prometheus metrics (GET /metrics; the names and labels: docs/operations.md,
"Metrics").

    registry.py    Metrics: one app's CollectorRegistry (never the global one), and a scrape
    collectors.py  what is read at scrape time: models (in flight, queue, state, restarts,
                   failures, downloads, worker memory and CPU), GPUs, up and build info;
                   the lifecycle listener (restarts, failure times, load durations)
    engines.py     the workers' own /metrics (vLLM, llama.cpp), relayed with a `model` label
    requests.py    per-request counts and latencies, tallied by the serving layer

Nothing is measured per request except by requests.py; everything else costs only a scrape.
"""

from modelhost.metrics.registry import Metrics

__all__ = ["Metrics"]
