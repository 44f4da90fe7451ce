"""The per-request metrics of the relayed calls at GET /metrics (metrics/requests.py): counts
by model, route and status class, the duration and gateway-overhead histograms, a stream's
time to first token, rejections; the same on the wire path and the ASGI path; unknown model
names make no series."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway, fake_model, gateways

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module", params=["wire", "asgi"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp(request.param)
    with gateways(folder) as make:
        yield make([fake_model("fake"), fake_model("speech", task="transcription"),
                    fake_model("narrow", max_concurrency=1, max_queue=0)],
                   env={"MODELHOST_ACCESS_LOG": "true" if request.param == "asgi"
                        else "false"})


def samples(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(gw.url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def chat(gw: Gateway, model: str = "fake", **body: object) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                      json={"model": model, "messages": MESSAGES, **body})


def test_requests_are_counted_by_model_route_and_status(gateway: Gateway) -> None:
    before = samples(gateway)
    for _ in range(7):
        assert chat(gateway).status_code == 200
    for _ in range(3):
        assert chat(gateway, fake={"status": 400}).status_code == 400
    assert chat(gateway, fake={"status": 500}).status_code == 502
    for _ in range(2):
        resp = httpx.post(gateway.url + "/v1/chat/completions", timeout=30, json={
            "model": "fake", "messages": MESSAGES, "stream": True, "fake": {"tokens": 4}})
        assert b"[DONE]" in resp.content
    files = {"file": ("a.wav", b"RIFF" + b"\0" * 100, "audio/wav")}
    assert httpx.post(gateway.url + "/v1/audio/transcriptions", files=files, timeout=30,
                      data={"model": "speech"}).status_code == 200
    after = samples(gateway)

    def added(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    chat_labels = {"model": "fake", "route": "chat"}
    assert added("modelhost_requests_total", status="2xx", **chat_labels) == 9
    assert added("modelhost_requests_total", status="4xx", **chat_labels) == 3
    assert added("modelhost_requests_total", status="5xx", **chat_labels) == 1
    assert added("modelhost_request_duration_seconds_count", **chat_labels) == 13
    assert added("modelhost_gateway_overhead_seconds_count", **chat_labels) == 13
    assert added("modelhost_time_to_first_token_seconds_count", **chat_labels) == 2
    assert added("modelhost_request_duration_seconds_bucket", le="+Inf", **chat_labels) == 13
    assert 0 < added("modelhost_request_duration_seconds_sum", **chat_labels) < 13 * 30
    assert added("modelhost_requests_total", model="speech", route="transcriptions",
                 status="2xx") == 1
    # The gateway's own part is a small share of the whole.
    assert added("modelhost_gateway_overhead_seconds_sum", **chat_labels) <= \
        added("modelhost_request_duration_seconds_sum", **chat_labels)


def test_a_full_queue_is_a_counted_rejection(gateway: Gateway) -> None:
    assert chat(gateway, "narrow").status_code == 200  # loaded
    before = samples(gateway)
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: chat(gateway, "narrow", fake={
            "first_token_delay": 0.5}).status_code, range(6)))
    assert 429 in statuses and 200 in statuses
    after = samples(gateway)
    refused = statuses.count(429)
    labels = {"model": "narrow", "reason": "queue_full"}
    assert value(after, "modelhost_rejections_total", **labels) - \
        value(before, "modelhost_rejections_total", **labels) == refused
    assert value(after, "modelhost_requests_total", model="narrow", route="chat",
                 status="4xx") - value(before, "modelhost_requests_total", model="narrow",
                                       route="chat", status="4xx") == refused


def test_made_up_model_names_make_no_series(gateway: Gateway) -> None:
    before = {key for key in samples(gateway) if key[0].startswith("modelhost_request")}
    with httpx.Client(timeout=30) as client:
        for i in range(2000):
            resp = client.post(gateway.url + "/v1/chat/completions",
                               json={"model": f"made-up-{i}", "messages": MESSAGES})
            assert resp.status_code == 404
    after = {key for key in samples(gateway) if key[0].startswith("modelhost_request")}
    assert after == before
    assert not any("made-up" in str(key) for key in samples(gateway))


def test_an_unknown_route_is_no_series(gateway: Gateway, tmp_path: Path) -> None:
    assert httpx.post(gateway.url + "/v1/chat/completionsX", json={}).status_code == 404
    assert not any("completionsX" in str(key) for key in samples(gateway))


def test_every_model_has_its_series_at_zero_from_the_start(gateway: Gateway) -> None:
    """So that a first 5xx is an increase Prometheus sees (a series born at 1 is none)."""
    found = samples(gateway)
    for route in ("chat", "completions"):
        for status in ("2xx", "4xx", "5xx"):
            assert ("modelhost_requests_total", (("model", "narrow"), ("route", route),
                                                 ("status", status))) in found
    assert value(found, "modelhost_requests_total", model="speech", route="translations",
                 status="5xx") == 0
    assert ("modelhost_requests_total", (("model", "speech"), ("route", "chat"),
                                         ("status", "2xx"))) not in found
