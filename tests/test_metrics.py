"""GET /metrics on a real `modelhost serve`: every figure known at scrape time, the engines'
own metrics relayed with a `model` label (tests/metrics_worker.py stands in for vLLM, in
good and bad shapes), bounded labels under made-up model names, and the GPU figures against
the NVML stand-in of the inventory tests (none without a GPU).

The per-request metrics (requests, latencies, rejections) are the serving layer's, tested
with it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from modelhost import __version__
from modelhost.gpu.inventory import GpuMonitor
from modelhost.metrics.collectors import GpuCollector, process_tree_usage
from modelhost.metrics.engines import relabel
from modelhost.registry.lifecycle import State
from tests.conftest import Gateway, GatewayFactory, fake_model, wait_for
from tests.fake_hub import FakeHub
from tests.test_gpu import FakeGpu, FakeNvml

METRICS_WORKER = str(Path(__file__).parent / "metrics_worker.py")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def engine(model_id: str, mode: str = "ok", events: Path | None = None,
           **fields: Any) -> dict[str, Any]:
    command = [sys.executable, METRICS_WORKER, "--port", "{port}", "--mode", mode]
    if events is not None:
        command += ["--events", str(events)]
    return {"id": model_id, "backend": "command", "command": command, **fields}


def scrape(url: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url + "/metrics", headers=headers, timeout=30)


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, metric: str, /, **labels: str) -> float:
    return found[(metric, frozenset(labels.items()))]


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("events") / "absent.events"


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory, events: Path) -> Gateway:
    gw = module_gateway_factory([
        engine("eng", max_queue=7), engine("eng2"), engine("absent", "absent", events),
        engine("slow", "slow"), engine("huge", "huge"), engine("broken", "broken"),
        fake_model("idle"), fake_model("busy", max_concurrency=1), fake_model("crashy"),
        fake_model("bad", None, "--exit-at-start", "3", max_restarts=1),
    ])
    for model_id in ("eng", "eng2", "absent", "slow", "huge", "broken", "crashy"):
        resp = httpx.post(f"{gw.url}/api/admin/models/{model_id}/load", timeout=60)
        assert resp.status_code == 200, resp.text
    resp = httpx.post(f"{gw.url}/api/admin/models/bad/load", timeout=60)
    assert resp.status_code >= 400
    gw.wait_state("bad", "failed")
    return gw


@pytest.fixture(scope="module")
def scraped(gateway: Gateway) -> tuple[httpx.Response, Samples]:
    resp = scrape(gateway.url)
    return resp, samples(resp.text)


def test_exposition_format_and_gateway_info(scraped: tuple[httpx.Response, Samples]) -> None:
    resp, found = scraped
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert value(found, "modelhost_up") == 1  # the engine's own `modelhost_up` is dropped
    assert resp.text.count("\nmodelhost_up ") == 1
    assert value(found, "modelhost_build_info", version=__version__) == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (Debian's prometheus)")
def test_promtool_accepts_the_scrape(scraped: tuple[httpx.Response, Samples]) -> None:
    """Prometheus's own checker: it parses the whole scrape (ours and the engines'), and its
    lint finds nothing but the colons of vLLM's names (the engines' names are relayed as
    they are)."""
    resp, _ = scraped
    done = subprocess.run(["promtool", "check", "metrics"], input=resp.text, text=True,
                          capture_output=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if line.strip() and "should not contain ':'" not in line]
    assert not problems, problems
    assert done.returncode in (0, 3)  # 3: lint problems (the colons), not a parse error


def test_model_gauges(scraped: tuple[httpx.Response, Samples]) -> None:
    _, found = scraped
    for model_id in ("eng", "eng2", "idle", "bad"):
        assert value(found, "modelhost_requests_in_flight", model=model_id) == 0
        assert value(found, "modelhost_queue_depth", model=model_id) == 0
    assert value(found, "modelhost_queue_limit", model="eng") == 7
    assert value(found, "modelhost_queue_limit", model="idle") == 256
    expected = {"eng": State.ready, "idle": State.cached, "bad": State.failed}
    for model_id, current in expected.items():
        states = {s.value: value(found, "modelhost_model_state", model=model_id,
                                 state=s.value) for s in State}
        assert states == {s.value: float(s is current) for s in State}


def test_lifecycle_figures(scraped: tuple[httpx.Response, Samples]) -> None:
    _, found = scraped
    # One start retried, then given up: one restart, one failure, now.
    assert value(found, "modelhost_model_restarts_total", model="bad") == 1
    assert value(found, "modelhost_model_restarts_total", model="eng") == 0
    failed_at = value(found, "modelhost_model_last_failure_timestamp_seconds", model="bad")
    assert time.time() - 300 < failed_at <= time.time()
    assert value(found, "modelhost_model_last_failure_timestamp_seconds", model="eng") == 0
    # Loads observed cached -> ready; never loaded: no series.
    assert value(found, "modelhost_model_load_duration_seconds_count", model="eng") == 1
    assert 0 < value(found, "modelhost_model_load_duration_seconds_sum", model="eng") < 60
    assert value(found, "modelhost_model_load_duration_seconds_bucket", model="eng",
                 le="+Inf") == 1
    assert not any(labels == frozenset({("model", "idle")}) and "load_duration" in name
                   for name, labels in found)


def test_worker_processes(gateway: Gateway, scraped: tuple[httpx.Response, Samples]) -> None:
    _, found = scraped
    pid = gateway.admin_card("eng")["worker"]["pid"]
    rss = value(found, "modelhost_worker_resident_memory_bytes", model="eng")
    cpu = value(found, "modelhost_worker_cpu_seconds_total", model="eng")
    assert 10 * 2**20 < rss < 2**31  # the shim and a Python engine
    assert cpu > 0
    usage = process_tree_usage(pid)
    assert usage is not None and usage[1] >= cpu
    # No worker, no figure.
    assert ("modelhost_worker_resident_memory_bytes",
            frozenset({("model", "idle")})) not in found


def test_no_gpu_no_gpu_metrics(scraped: tuple[httpx.Response, Samples]) -> None:
    resp, _ = scraped
    assert "modelhost_gpu_" not in resp.text


def test_engine_metrics_relayed_with_model_label(
        scraped: tuple[httpx.Response, Samples]) -> None:
    resp, found = scraped
    for model_id in ("eng", "eng2"):
        assert value(found, "vllm:num_requests_running", model=model_id,
                     model_name="engine-name") == 3
        # The engine's own `model` label is kept as `exported_model`.
        assert value(found, "vllm:prompt_tokens_total", model=model_id,
                     model_name="engine-name", exported_model="inner") == 42
        assert value(found, "vllm:e2e_request_latency_seconds_bucket", model=model_id,
                     le="+Inf") == 2
        assert value(found, "vllm:e2e_request_latency_seconds_sum", model=model_id) == 3.5
    # Two engines, one family each: one TYPE line (Prometheus refuses a second).
    assert resp.text.count("# TYPE vllm:num_requests_running gauge") == 1
    # The slow, oversized and broken ones are left out; the scrape stands.
    assert not any(("model", bad) in labels for _, labels in found if _.startswith("vllm")
                   for bad in ("slow", "huge", "broken", "absent"))


def test_in_flight_and_queue_depth(gateway: Gateway) -> None:
    """Three slow requests to a model that takes one at a time: one in flight, two queued."""
    def slow_chat() -> None:
        httpx.post(gateway.url + "/v1/chat/completions", timeout=60, json={
            "model": "busy", "messages": [{"role": "user", "content": "x"}],
            "fake": {"first_token_delay": 3}})

    def figures() -> tuple[float, float]:
        found = samples(scrape(gateway.url).text)
        return (value(found, "modelhost_requests_in_flight", model="busy"),
                value(found, "modelhost_queue_depth", model="busy"))

    threads = [threading.Thread(target=slow_chat) for _ in range(3)]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: figures() == (1, 2), 30), figures()
    for thread in threads:
        thread.join()
    assert figures() == (0, 0)


def test_crash_restart_counted_not_a_load(gateway: Gateway) -> None:
    before = samples(scrape(gateway.url).text)
    assert value(before, "modelhost_model_restarts_total", model="crashy") == 0
    with contextlib.suppress(httpx.HTTPError), httpx.stream(
            "POST", gateway.url + "/v1/chat/completions", timeout=30, json={
                "model": "crashy", "messages": [{"role": "user", "content": "x"}],
                "stream": True, "fake": {"tokens": 5, "crash_after": 1}}) as resp:
        resp.read()
    assert wait_for(lambda: value(samples(scrape(gateway.url).text),
                                  "modelhost_model_restarts_total", model="crashy") == 1, 30)
    gateway.wait_state("crashy", "ready")
    after = samples(scrape(gateway.url).text)
    assert value(after, "modelhost_model_load_duration_seconds_count", model="crashy") == 1
    # A crash is not a failure: the model came back.
    assert value(after, "modelhost_model_last_failure_timestamp_seconds", model="crashy") == 0


def test_worker_without_metrics_is_asked_once(gateway: Gateway, events: Path) -> None:
    for _ in range(2):
        assert scrape(gateway.url).status_code == 200
    assert events.read_text().split() == ["metrics"]


def test_made_up_models_and_routes_create_no_series(gateway: Gateway) -> None:
    def series() -> set[str]:
        return {line.split(" ")[0] for line in scrape(gateway.url).text.splitlines()
                if line and not line.startswith("#")}

    before = series()
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        for i in range(2000):
            resp = client.post("/v1/chat/completions", json={
                "model": f"made-up-{i}", "messages": [{"role": "user", "content": "x"}]})
            assert resp.status_code == 404
        for i in range(50):
            assert client.post(f"/v1/made-up-route-{i}", json={}).status_code == 404
            assert client.get(f"/metrics-{i}").status_code == 404
    after = series()
    assert not any("made-up" in name for name in after)
    assert after == before  # values may change, never the series


def test_admin_key_protects_metrics(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([], env={"OPENAI_API_KEYS": "sk-inf",
                                  "MODELHOST_ADMIN_KEYS": "sk-admin"})
    assert scrape(gw.url).status_code == 401
    assert scrape(gw.url, "sk-inf").status_code == 403
    assert scrape(gw.url, "sk-wrong").status_code == 401
    resp = scrape(gw.url, "sk-admin")
    assert resp.status_code == 200 and "modelhost_up 1.0" in resp.text


def test_download_progress(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "org" / "tiny" / "main"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "tiny"}')
    (repo / "weights.bin").write_bytes(os.urandom(300_000))
    with FakeHub(tmp_path / "hub") as hub:
        gw = gateway_factory([fake_model("tiny", source={"hf": "org/tiny"})], env={
            "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
            "MODEL_CACHE_DIR": str(tmp_path / "cache")})
        found = samples(scrape(gw.url).text)
        assert value(found, "modelhost_model_state", model="tiny", state="absent") == 1
        assert ("modelhost_download_bytes", frozenset({("model", "tiny")})) not in found
        resp = httpx.post(gw.url + "/api/admin/models/tiny/download", timeout=30)
        assert resp.status_code == 202, resp.text
        assert wait_for(lambda: gw.model("tiny")["state"] == "cached", 60)
        found = samples(scrape(gw.url).text)
    total = value(found, "modelhost_download_total_bytes", model="tiny")
    assert total >= 300_000
    assert value(found, "modelhost_download_bytes", model="tiny") == total


def test_gpu_metrics_from_nvml() -> None:
    nvml = FakeNvml([
        FakeGpu("NVIDIA H100 80GB HBM3", "GPU-0", total=80 * 2**30, used=20 * 2**30,
                utilization=(37, 5), temperature=61, power_mw=312_500),
        FakeGpu(b"NVIDIA L4", "GPU-1", total=24 * 2**30, used=2**30,
                unsupported={"utilization", "temperature", "power"}),
    ])
    monitor = GpuMonitor(nvml=nvml)
    assert monitor.start()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpuCollector(monitor))
    found = samples(generate_latest(registry).decode())
    h100 = {"gpu": "0", "name": "NVIDIA H100 80GB HBM3"}
    l4 = {"gpu": "1", "name": "NVIDIA L4"}
    assert value(found, "modelhost_gpu_memory_used_bytes", **h100) == 20 * 2**30
    assert value(found, "modelhost_gpu_memory_total_bytes", **h100) == 80 * 2**30
    assert value(found, "modelhost_gpu_utilization_ratio", **h100) == 0.37
    assert value(found, "modelhost_gpu_temperature_celsius", **h100) == 61
    assert value(found, "modelhost_gpu_power_watts", **h100) == 312.5
    assert value(found, "modelhost_gpu_memory_total_bytes", **l4) == 24 * 2**30
    # What the board does not report has no sample (not a 0).
    for name in ("utilization_ratio", "temperature_celsius", "power_watts"):
        assert (f"modelhost_gpu_{name}", frozenset(l4.items())) not in found
    # No GPU: no family at all, not even its HELP line.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpuCollector(GpuMonitor(nvml=FakeNvml([], init_error=12))))
    assert generate_latest(registry) == b""


def test_relabel_drops_clashes() -> None:
    counter = "# TYPE x_total counter\nx_total 1\n"
    gauge = "# TYPE x_total gauge\nx_total 5\n"
    out = samples(relabel([("a", counter), ("b", gauge), ("c", "not {valid"),
                           ("d", counter)]).decode())
    assert out == {("x_total", frozenset({("model", "a")})): 1.0,
                   ("x_total", frozenset({("model", "d")})): 1.0}


def test_exposition_is_the_client_librarys_byte_for_byte() -> None:
    """metrics/exposition.render writes what prometheus_client's generate_latest writes, for
    every kind of family (counters with _created, histograms, gauges, info, state sets,
    summaries, gauge histograms, timestamps, label values to escape), for the request
    tallies and for the GPUs."""
    from prometheus_client import Counter, Enum, Gauge, Histogram, Info, Summary
    from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily

    from modelhost.metrics.exposition import render
    from modelhost.metrics.requests import RequestMetrics

    registry = CollectorRegistry(auto_describe=False)
    counter = Counter("things", "Things.\nWith a \\ second line.", ["model", "route"],
                      registry=registry)
    counter.labels('odd "name"\\with\nbreaks', "chat").inc(3)
    counter.labels("m", "chat").inc(1e21)
    Gauge("level", "A level.", registry=registry).set(float("nan"))
    Gauge("lows", "Lows.", registry=registry).set(float("-inf"))
    histogram = Histogram("took_seconds", "Took.", ["model"], registry=registry,
                          buckets=(0.001, 0.5, 1234567.0))
    for seconds in (0.0004, 0.2, 3.0, 2e7):
        histogram.labels("m").observe(seconds)
    Info("build", "Build.", registry=registry).info({"version": "1.2", "commit": "abc"})
    Enum("phase", "Phase.", states=["a", "b"], registry=registry).state("b")
    Summary("sizes_bytes", "Sizes.", registry=registry).observe(12.5)

    class Custom:
        def collect(self) -> Any:
            g = GaugeMetricFamily("stamped", "Stamped.", labels=["k"])
            g.add_metric(["v"], 1.5, timestamp=1700000000.25)
            yield g
            gh = GaugeHistogramMetricFamily("queue_hist", "Queue.", labels=["k"])
            gh.add_metric(["v"], [("1.0", 2.0), ("+Inf", 3.0)], gsum_value=4.0)
            yield gh

    registry.register(Custom())
    calls = RequestMetrics(lambda: {"m": "chat", "e": "embedding"})
    for status, seconds in ((200, 0.02), (503, 1.5), (429, 0.0)):
        RequestMetrics.record(calls.tally("m", "/chat/completions"), status, seconds, 0.0002)
    RequestMetrics.first_token(calls.tally("m", "/chat/completions"), 0.3)
    calls.rejected("m", "queue_full")
    registry.register(calls)
    nvml = FakeNvml([FakeGpu("NVIDIA H100 80GB HBM3", "GPU-0", total=80 * 2**30,
                             used=20 * 2**30, utilization=(37, 5), temperature=61,
                             power_mw=312_500)])
    monitor = GpuMonitor(nvml=nvml)
    assert monitor.start()
    registry.register(GpuCollector(monitor))
    expected = generate_latest(registry)
    assert b'odd \\"name\\"\\\\with\\nbreaks' in expected and b"NaN" in expected
    assert render(registry) == expected
