"""Lifecycle and supervision, end to end: lazy load, preload, readiness, waits, failures,
idle unload, admission, and no orphan worker after the gateway dies."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    GatewayFactory,
    describe_process,
    fake_model,
    started_pids,
    wait_for,
    wait_gone,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(url: str, model: str = "fake", timeout: float = 30, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions",
                      json={"model": model, "messages": MESSAGES, **body}, timeout=timeout)


def test_lazy_load_on_first_request_and_concurrent_requests_share_it(
        gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    events = tmp_path / "ev"
    gw = gateway_factory([fake_model("fake", events, "--startup-delay", "1")])
    assert gw.model("fake")["state"] == "cached"
    assert started_pids(events) == []
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(chat(gw.url).status_code))
               for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 5
    assert len(started_pids(events)) == 1  # one load, shared by every waiting request
    assert gw.model("fake")["state"] == "ready"


def test_preload_when_lazy_load_is_off(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    events = tmp_path / "ev"
    gw = gateway_factory([fake_model("fake", events)], env={"LAZY_LOAD_MODELS": "false"})
    gw.wait_state("fake", "ready", timeout=20)
    assert len(started_pids(events)) == 1


def test_ready_waits_for_required_models(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    gw = gateway_factory([
        fake_model("slow", tmp_path / "ev", "--startup-delay", "1.5", required=True),
        fake_model("lazy"),
    ])
    resp = httpx.get(gw.url + "/ready")
    assert resp.status_code == 503
    assert resp.json()["waiting_for"] == ["slow"]
    assert wait_for(lambda: httpx.get(gw.url + "/ready").status_code == 200, timeout=20)
    assert httpx.get(gw.url + "/ready").json()["models"] == {"slow": "ready", "lazy": "cached"}


def test_load_wait_is_bounded_with_503_and_retry_after(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("fake", None, "--startup-delay", "3")],
                         env={"MODELHOST_LOAD_WAIT_TIMEOUT": "0.5"})
    resp = chat(gw.url)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "model_not_ready"
    assert int(resp.headers["retry-after"]) >= 1
    gw.wait_state("fake", "ready", timeout=20)  # the load went on in the background
    assert chat(gw.url).status_code == 200


def test_worker_that_cannot_start_fails_with_its_reason(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("broken", None, "--exit-at-start", "3",
                                     max_restarts=1)])
    resp = chat(gw.url, model="broken")
    assert resp.status_code == 502
    error = resp.json()["error"]
    assert error["code"] == "model_failed"
    # The reason is for operators: the inference client is pointed at the admin API.
    assert "exited" not in error["message"] and "exiting" not in error["message"]
    assert "/api/admin/models/broken" in error["message"]
    assert gw.model("broken")["last_error"] == "failed"
    card = httpx.get(gw.url + "/api/admin/models/broken", timeout=5).json()
    assert card["state"] == "failed"
    assert "exited with status 3" in card["last_error"]
    assert "exiting at start as asked" in card["last_error"]  # the worker's own output
    # While failed, requests fail fast with Retry-After instead of restarting each time.
    resp = chat(gw.url, model="broken")
    assert resp.status_code == 502
    assert "retry-after" in resp.headers


def test_missing_command_fails_without_retries(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([{"id": "ghost", "backend": "command",
                           "command": ["/nonexistent/server", "--port", "{port}"]}])
    resp = chat(gw.url, model="ghost")
    assert resp.status_code == 502
    assert gw.model("ghost")["state"] == "failed"


def test_crash_loop_ends_in_failed(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    events = tmp_path / "ev"
    gw = gateway_factory([fake_model("fake", events, max_restarts=2)])
    assert chat(gw.url).status_code == 200
    for crash in range(3):
        pid = started_pids(events)[-1]
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid)
        if crash < 2:  # restarted after a backoff, ready again
            def restarted(old: int = pid) -> bool:
                return started_pids(events)[-1] != old

            assert wait_for(restarted, timeout=15)
            gw.wait_state("fake", "ready", timeout=15)
    gw.wait_state("fake", "failed", timeout=15)
    card = httpx.get(gw.url + "/api/admin/models/fake", timeout=5).json()
    assert "gave up after 2 restart(s)" in card["last_error"]


def test_idle_model_is_unloaded_and_its_process_is_gone(gateway_factory: GatewayFactory,
                                                        tmp_path: Path) -> None:
    events = tmp_path / "ev"
    gw = gateway_factory([fake_model("fake", events, idle_ttl=1)])
    assert chat(gw.url).status_code == 200
    pid = started_pids(events)[-1]
    gw.wait_state("fake", "cached", timeout=15)
    assert wait_gone(pid)
    assert chat(gw.url).status_code == 200  # loads again on the next request
    assert len(started_pids(events)) == 2


def test_busy_model_is_not_unloaded(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    events = tmp_path / "ev"
    gw = gateway_factory([fake_model("fake", events, idle_ttl=1)])
    # A 3 s stream on a model with a 1 s idle TTL: the stream must finish intact.
    resp = chat(gw.url, stream=True, fake={"tokens": 6, "gap": 0.5})
    assert resp.status_code == 200
    assert resp.text.rstrip().endswith("data: [DONE]")
    assert len(started_pids(events)) == 1


def test_full_queue_is_429(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("fake", max_concurrency=1, max_queue=0)])
    assert chat(gw.url).status_code == 200
    slow = threading.Thread(target=chat, args=(gw.url,),
                            kwargs={"fake": {"first_token_delay": 2}})
    slow.start()
    time.sleep(0.5)
    resp = chat(gw.url)
    slow.join()
    assert resp.status_code == 429
    assert resp.json()["error"]["type"] == "rate_limit_error"
    assert "retry-after" in resp.headers


def test_graceful_shutdown_stops_workers(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    events = tmp_path / "ev"
    gw = gateway_factory([fake_model("fake", events)])
    assert chat(gw.url).status_code == 200
    pid = started_pids(events)[-1]
    gw.stop()
    # uvicorn re-raises SIGTERM after its graceful shutdown has run.
    assert gw.proc.returncode in (0, -signal.SIGTERM)
    assert "model fake: stopping -> cached" in gw.output()
    assert wait_gone(pid, timeout=5)


def test_no_orphan_when_the_gateway_is_killed(gateway_factory: GatewayFactory,
                                              tmp_path: Path) -> None:
    events = tmp_path / "ev"
    gw = gateway_factory([fake_model("a", events), fake_model("b", events)])
    assert chat(gw.url, model="a").status_code == 200
    assert chat(gw.url, model="b").status_code == 200
    pids = started_pids(events)
    assert len(pids) == 2
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait()
    for pid in pids:
        assert wait_gone(pid, timeout=10), \
            f"worker survived the gateway: {describe_process(pid)}\n{gw.output()[-3000:]}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_worker_output_goes_to_its_log_file(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("fake")])
    assert chat(gw.url).status_code == 200
    log = gw.tmp / "data" / "logs" / "workers" / "fake.log"
    assert "fake worker starting" in log.read_text()
