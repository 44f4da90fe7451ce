"""A stream whose client leaves once it has the last event (`data: [DONE]`) is a whole
answer, not a failure: OpenAI's own client closes the stream right there, while the worker
may end its answer a moment later (a loaded one does). Counted as a 502 it showed as an error
on /metrics and, during a blue-green update, rolled a healthy new version back.

A real gateway and the fake worker holding its answer open for 2 s after `[DONE]`.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.conftest import GatewayFactory, fake_model, wait_for

ADMIN = "sk-stream-end-admin-7c1e4b9a2d"
KEY = "sk-stream-end-4f8a2c6e1b9d"


def counted(metrics: str, status: str) -> float:
    found = re.search(r'^modelhost_requests_total\{model="chat",route="chat",'
                      rf'status="{status}"\}} (\S+)$', metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_leaves_after_the_last_event_got_a_whole_answer(
        gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    gw = gateway_factory([fake_model("chat", tmp_path / "events")],
                         env={"OPENAI_API_KEYS": KEY, "MODELHOST_ADMIN_KEYS": ADMIN})

    def metrics() -> str:
        return httpx.get(gw.url + "/metrics", timeout=10,
                         headers={"Authorization": f"Bearer {ADMIN}"}).text

    for leave_early in (True, False):
        body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}],
                "fake": {"end_delay": 2.0} if leave_early else {"tokens": 2}}
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if leave_early and line == "data: [DONE]":
                    break  # and close, as OpenAI's client does
    assert wait_for(lambda: counted(metrics(), "2xx") == 2, 10), metrics()
    assert counted(metrics(), "5xx") == 0

    # A client that leaves before the last event did not get the whole answer.
    body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}],
            "fake": {"tokens": 50, "gap": 0.1}}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                break
    assert wait_for(lambda: counted(metrics(), "5xx") == 1, 10), metrics()
