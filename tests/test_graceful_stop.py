"""Graceful stop (`server.GatewayServer`): on SIGTERM a real `modelhost serve` stops taking new
requests (503 with Retry-After, `/ready` 503) while the ones in flight, streams included, finish;
then it stops its workers and exits, none left behind."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayFactory, fake_model, started_pids, wait_for, wait_gone


def chat(stream: bool = False, **fake: Any) -> dict[str, Any]:
    return {"model": "m", "stream": stream, "fake": fake,
            "messages": [{"role": "user", "content": "hi"}]}


class Stream(threading.Thread):
    """A streamed chat request read to its end in a thread: its status and the content of
    its events."""

    def __init__(self, url: str, tokens: int, gap: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.body = chat(True, tokens=tokens, gap=gap)
        self.first = threading.Event()
        self.status = 0
        self.events: list[str] = []
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=self.body,
                              timeout=60) as resp:
                self.status = resp.status_code
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.first.set()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.first.set()

    def content(self) -> str:
        return "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                       for e in self.events if e != "[DONE]")


def test_sigterm_drains_then_stops(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    events = tmp_path / "events"
    gw = gateway_factory([fake_model("m", events)])
    assert httpx.post(gw.url + "/v1/chat/completions", json=chat(), timeout=30).is_success
    pids = started_pids(events)
    stream = Stream(gw.url, tokens=25, gap=0.12)  # 3 s
    assert stream.first.wait(10) and stream.status == 200
    gw.proc.send_signal(signal.SIGTERM)

    # At once: not ready, and a new request is refused with a Retry-After.
    assert wait_for(lambda: httpx.get(gw.url + "/ready", timeout=5).status_code == 503, 2)
    refused = httpx.post(gw.url + "/v1/chat/completions", json=chat(), timeout=5)
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert httpx.get(gw.url + "/health", timeout=5).status_code == 200

    # The stream in flight completes, whole; then the gateway and its worker are gone.
    stream.join(30)
    assert stream.error is None and stream.status == 200
    assert stream.events[-1] == "[DONE]"
    assert stream.content() == "".join(f"word{i} " for i in range(25))
    assert gw.proc.wait(20) in (0, -signal.SIGTERM)
    assert pids and all(wait_gone(pid) for pid in pids)
    output = gw.output()
    assert "draining" in output and "Traceback" not in output


@pytest.mark.parametrize("how", ["drain timeout", "second signal"])
def test_a_stream_longer_than_the_drain_is_cut(gateway_factory: GatewayFactory,
                                                tmp_path: Path, how: str) -> None:
    events = tmp_path / "events"
    drain = "1" if how == "drain timeout" else "120"
    gw = gateway_factory([fake_model("m", events)], env={"MODELHOST_DRAIN_TIMEOUT": drain})
    stream = Stream(gw.url, tokens=600, gap=0.1)  # a minute
    assert stream.first.wait(20) and stream.status == 200
    pids = started_pids(events)
    start = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    if how == "second signal":
        time.sleep(0.5)
        assert gw.proc.poll() is None  # still draining
        gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(30) in (0, -signal.SIGTERM)
    assert time.monotonic() - start < 30
    stream.join(10)
    assert "[DONE]" not in stream.events  # cut, not finished
    assert pids and all(wait_gone(pid) for pid in pids)
    assert "cut off" in gw.output()
